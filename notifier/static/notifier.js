// notifier.js: the browser client for notifier's WebSocket protocol.
//
// An ES module with no dependencies and no build step; notifier serves it at
// /static/notifier.js, with its types in notifier.d.ts beside it. The server
// keeps every message in order and durable; this module keeps the client's
// half of "nothing missed, nothing twice": it reconnects by itself, resumes
// every topic from the last (seq, epoch) it handed to the app, drops what it
// has already handed over, refreshes the token before it expires, and acks.

const DEFAULTS = {
  autoAck: true,
  backoff: { base: 500, max: 30000, stableAfter: 10000 },
  pingInterval: 25000,
  pongTimeout: 10000,
  connectTimeout: 15000,
  refreshBefore: 60000,
  ackDelay: 100,
  holdLimit: 1000,
};

// Close codes this client reports for closes it decides itself; the server's
// own are in docs/protocol.md. 4000 is in the private-use range and unused
// by the server.
export const CLOSE_NO_ANSWER = 4000;
export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_FORBIDDEN = 4003;

/** Full-jitter exponential backoff: a delay drawn uniformly from
 * [0, min(max, base * 2^attempt)). Spreading reconnects over the whole
 * window keeps clients that lost the same server from returning together. */
export function backoffDelay(attempt, { base, max }, random = Math.random) {
  return random() * Math.min(max, base * 2 ** attempt);
}

/** Per topic, the last stored message handed to the app: its seq, and the
 * epoch of the log that seq belongs to. It decides which messages are new
 * (accept) and where to resume after a reconnect. */
export class Positions {
  constructor() {
    this.topics = new Map();
  }

  /** {seq, epoch} of a topic, or undefined. seq is null until a message is
   * handed over (or the start of a live-only subscription is known). */
  get(topic) {
    const position = this.topics.get(topic);
    return position && { seq: position.seq, epoch: position.epoch };
  }

  /** Start from a seq the app chose (subscribe's `since`), in `epoch` if known. */
  start(topic, seq, epoch = null) {
    this.topics.set(topic, { seq, epoch });
  }

  forget(topic) {
    this.topics.delete(topic);
  }

  /** A `subscribed` frame for the topic, with or without a ref. Returns true
   * when the log was reset under us: another epoch, or a head below the seq
   * already handed over. The old position then means nothing and is dropped. */
  subscribed(topic, epoch, head) {
    const position = this.topics.get(topic);
    if (position === undefined) {
      this.topics.set(topic, { seq: null, epoch });
      return false;
    }
    const reset = (position.epoch !== null && position.epoch !== epoch)
      || (position.seq !== null && head < position.seq);
    if (reset) position.seq = null;
    position.epoch = epoch;
    return reset;
  }

  /** Whether a message with this seq is new, moving the position if it is.
   * Ephemeral messages (seq null) are never stored, so never repeated. */
  accept(topic, seq) {
    if (seq === null || seq === undefined) return true;
    let position = this.topics.get(topic);
    if (position === undefined) {
      position = { seq: null, epoch: null };
      this.topics.set(topic, position);
    }
    if (position.seq !== null && seq <= position.seq) return false;
    position.seq = seq;
    return true;
  }

  /** The start of a live-only subscription: nothing at or below `head` will
   * come, so resume after it. Only when nothing was handed over yet. */
  settle(topic, head) {
    const position = this.topics.get(topic);
    if (position !== undefined && position.seq === null) position.seq = head;
  }
}

/** An error frame from the server, or a request that ended without a reply. */
export class NotifierError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "NotifierError";
    this.code = code;
  }
}

/** The `exp` claim of a JWT in milliseconds, or null if it cannot be read.
 * Read only to know when to refresh; the server checks the signature. */
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).exp;
    return Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

function socketUrl(url) {
  const resolved = new URL(url ?? "../ws", import.meta.url);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved;
}

export class NotifierClient extends EventTarget {
  constructor(options = {}) {
    super();
    if (!options.token && typeof options.getToken !== "function") {
      throw new TypeError("NotifierClient needs a token or a getToken function");
    }
    this.url = socketUrl(options.url).href;
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
    };
    this.positions = new Positions();
    /** "idle", "connecting", "open", "closed" (a reconnect is scheduled) or "stopped". */
    this.state = "idle";
    /** The token's `sub`, known from the first welcome on. */
    this.user = null;
    this.connection = null;
    this.token = options.token || null;
    this.attempt = 0;
    this.subscriptions = new Map(); // topic -> {handler, autoAck, head, confirmed, held, overflow}
    this.unwanted = new Set(); // personal topics the app unsubscribed from
    this.pending = new Map(); // ref -> {resolve, reject, topic?}
    this.settling = new Map(); // ping ref -> topics whose start that pong settles
    this.acks = new Map(); // topic -> highest seq to ack
    this.timers = {};
    this.socket = null;
    this.generation = 0;
    this.refs = 0;
    this.needFreshToken = false;
    this.wentOffline = false; // while the current socket was open
    this.onOnline = () => {
      // A socket that lived through an offline spell is likely dead (a new
      // network, a new address): replace it rather than wait for a pong.
      if (this.wentOffline && this.state === "open") this._abandon("back online", true);
      this._wake();
    };
    this.onOffline = () => {
      if (this.state === "open") this.wentOffline = true;
      this._checkNow();
    };
    this.onVisibility = () => {
      if (document.visibilityState === "visible") this._wake();
    };
  }

  get personalTopic() {
    return this.user === null ? null : `user:${this.user}`;
  }

  /** Start connecting (again, after close()); reconnects by itself from then on. */
  connect() {
    if (this.state === "connecting" || this.state === "open") return;
    this._clear("reconnect");
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    document.addEventListener("visibilitychange", this.onVisibility);
    this._open();
  }

  /** Stop for good: pending acks are sent, then the socket is closed with 1000. */
  close() {
    this._flushAcks();
    this._stop(1000, "client closed");
  }

  /** Hand every message of `topic` to `handler`, once, in seq order. `since`
   * replays from a seq (in `epoch`, from an earlier position); without it
   * the server resumes from the user's stored cursor, else from now, and the
   * personal topic from its offline queue. */
  subscribe(topic, handler, { since, epoch, autoAck } = {}) {
    if (typeof handler !== "function") throw new TypeError("subscribe needs a handler function");
    const before = this.subscriptions.get(topic);
    const subscription = {
      handler,
      autoAck: autoAck ?? this.options.autoAck,
      head: before ? before.head : null,
      confirmed: before ? before.confirmed : false,
    };
    this.subscriptions.set(topic, subscription);
    const wasUnwanted = this.unwanted.delete(topic); // then the server's subscription was ended
    if (since !== undefined) {
      this.positions.start(topic, since, epoch ?? null);
      if (this.state === "open") this._subscribe(topic);
      return;
    }
    if (before && before.held) {
      // The personal topic's queue, kept until now; what did not fit is asked for again.
      for (const frame of before.held) this._hand(topic, subscription, frame);
      if (before.overflow && this.state === "open") this._subscribe(topic);
      return;
    }
    if (this.state === "open" && !before && (topic !== this.personalTopic || wasUnwanted)) {
      this._subscribe(topic);
      this._settle([topic]);
    }
  }

  /** Stop receiving `topic` and forget its position. */
  unsubscribe(topic) {
    this._flushAcks();
    this.subscriptions.delete(topic);
    this.positions.forget(topic);
    if (topic.startsWith("user:")) this.unwanted.add(topic);
    if (this.state !== "open") return Promise.resolve();
    return this._request({ type: "unsubscribe", topic }).then(() => undefined);
  }

  /** Publish from the socket (the token's `publish` claim must allow the
   * topic). Resolves with {topic, seq, id} once stored; seq is null for an
   * ephemeral message. A socket publish has no idempotency key: if the
   * connection drops before the reply, it may or may not have been stored. */
  publish(topic, data, { event, ephemeral } = {}) {
    if (this.state !== "open") {
      return Promise.reject(new NotifierError("not_connected", "not connected"));
    }
    const frame = { type: "publish", topic, data };
    if (event !== undefined && event !== null) frame.event = event;
    if (ephemeral) frame.ephemeral = true;
    return this._request(frame).then(({ topic: t, seq, id }) => ({ topic: t, seq, id }));
  }

  /** Store the user's cursor for `topic` at `seq`, so a later connection
   * resumes after it. Acks are coalesced per topic and sent shortly after. */
  ack(topic, seq) {
    if (!Number.isInteger(seq)) return;
    const queued = this.acks.get(topic);
    if (queued === undefined || seq > queued) this.acks.set(topic, seq);
    if (this.timers.ack === undefined) {
      this.timers.ack = setTimeout(() => {
        delete this.timers.ack;
        this._flushAcks();
      }, this.options.ackDelay);
    }
  }

  /** The last (seq, epoch) handed to the app for `topic`: what a later page
   * can pass to subscribe as `since` and `epoch`. */
  position(topic) {
    return this.positions.get(topic);
  }

  // Connecting

  async _open() {
    const generation = ++this.generation;
    this._setState("connecting", { attempt: this.attempt });
    let token;
    try {
      token = await this._tokenForConnect();
    } catch (error) {
      if (generation !== this.generation) return;
      this._emit("error", { code: "token", message: `getToken failed: ${error}`, error });
      this._closed(CLOSE_UNAUTHORIZED, "getToken failed", false);
      return;
    }
    if (generation !== this.generation) return;
    if (!token) {
      this._stop(CLOSE_UNAUTHORIZED, "no token");
      return;
    }
    const url = new URL(this.url);
    url.searchParams.set("token", token);
    const socket = new WebSocket(url.href);
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
    };
    socket.onmessage = (event) => this._onFrame(event.data);
    socket.onclose = (event) => this._closed(event.code, event.reason, opened);
    this.timers.connect = setTimeout(() => {
      this._abandon(`no welcome within ${this.options.connectTimeout / 1000} s`, opened);
    }, this.options.connectTimeout);
  }

  async _tokenForConnect() {
    if (typeof this.options.getToken !== "function") {
      const expiry = tokenExpiry(this.token);
      return expiry !== null && expiry <= Date.now() ? null : this.token;
    }
    const expiry = this.token && tokenExpiry(this.token);
    if (this.token && !this.needFreshToken && (expiry === null || expiry - Date.now() > 5000)) {
      return this.token;
    }
    return this._fetchToken();
  }

  async _fetchToken() {
    const token = await this.options.getToken();
    if (token === null || token === undefined || token === "") return null;
    if (typeof token !== "string") throw new TypeError("getToken must return a string or null");
    this.token = token;
    this.needFreshToken = false;
    return token;
  }

  _onWelcome(frame) {
    this._clear("connect");
    this.user = frame.user;
    this.connection = frame.connection;
    this.lastSeen = performance.now();
    this.pingSentAt = null;
    this.wentOffline = false;
    this.timers.stable = setTimeout(() => {
      this.attempt = 0;
    }, this.options.backoff.stableAfter);
    this._scheduleRefresh(frame.expires);
    const personal = this.personalTopic;
    const settle = [];
    if (this.unwanted.has(personal)) {
      this._send({ type: "unsubscribe", topic: personal });
    } else if (this.positions.get(personal)?.seq == null) {
      settle.push(personal); // the server's own subscription replays its queue first
    } else if (this.subscriptions.has(personal)) {
      // Resume from what was handed over: another tab's acks may have moved
      // the stored cursor past what this one has seen.
      this._subscribe(personal);
    }
    for (const topic of this.subscriptions.keys()) {
      if (topic === personal) continue;
      this._subscribe(topic);
      if (this.positions.get(topic)?.seq == null) settle.push(topic);
    }
    this._settle(settle);
    this._setState("open", { user: frame.user, connection: frame.connection, expires: frame.expires });
    this._flushAcks();
  }

  _subscribe(topic) {
    const frame = { type: "subscribe", topic };
    const position = this.positions.get(topic);
    if (position && position.seq !== null) {
      frame.since = position.seq;
      if (position.epoch !== null) frame.epoch = position.epoch;
    }
    this._request(frame, { topic }).catch((error) => this._refused(topic, error));
  }

  _refused(topic, error) {
    if (error.code === "disconnected") return; // resubscribed on the next connection
    if (error.code === "forbidden" || error.code === "invalid_topic") {
      this.subscriptions.delete(topic);
      this.positions.forget(topic);
    }
    this._emit("error", { code: error.code, message: error.message, topic });
  }

  /** A ping after subscribes: its pong comes after their replays (the server
   * runs one command at a time), so a topic that got no message by then was
   * live-only and resumes after the head its `subscribed` reported. */
  _settle(topics) {
    const ref = ++this.refs;
    this.settling.set(ref, topics);
    this._send({ type: "ping", ref });
  }

  // Frames

  _onFrame(text) {
    this.lastSeen = performance.now();
    this.pingSentAt = null;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        this._onWelcome(frame);
        break;
      case "subscribed":
        this._onSubscribed(frame);
        break;
      case "message":
        this._onMessage(frame);
        break;
      case "unsubscribed":
        if (frame.ref === undefined) this._onUnsubscribedByServer(frame.topic);
        break;
      case "authenticated":
        this._scheduleRefresh(frame.expires);
        this._emit("authenticated", { expires: frame.expires });
        break;
      case "pong":
        this._onPong(frame.ref);
        break;
      case "error":
        if (!this.pending.has(frame.ref)) {
          this._emit("error", { code: frame.code, message: frame.message });
        }
        break;
    }
    this._reply(frame);
  }

  _reply(frame) {
    if (frame.ref === undefined || !this.pending.has(frame.ref)) return;
    const { resolve, reject } = this.pending.get(frame.ref);
    this.pending.delete(frame.ref);
    if (frame.type === "error") reject(new NotifierError(frame.code, frame.message));
    else resolve(frame);
  }

  _onSubscribed(frame) {
    const topic = frame.topic;
    let subscription = this.subscriptions.get(topic);
    if (subscription === undefined) {
      if (topic !== this.personalTopic || this.unwanted.has(topic)) return;
      // The personal topic before the app asked for it: hold its queue.
      subscription = { handler: null, held: [], overflow: false, head: null, confirmed: false };
      this.subscriptions.set(topic, subscription);
    }
    const reset = this.positions.subscribed(topic, frame.epoch, frame.seq);
    if (reset) this.acks.delete(topic); // an old log's seq
    subscription.head = frame.seq;
    subscription.confirmed = true;
    if (this.acks.has(topic)) this._flushAcks();
    this._emit("subscribed", {
      topic, seq: frame.seq, epoch: frame.epoch, recovered: frame.recovered, reset,
    });
  }

  _onMessage(frame) {
    const subscription = this.subscriptions.get(frame.topic);
    if (subscription === undefined) return;
    if (subscription.handler === null) {
      if (subscription.held.length >= this.options.holdLimit) {
        subscription.overflow = true; // not accepted: asked for again on subscribe
        return;
      }
      if (this.positions.accept(frame.topic, frame.seq)) subscription.held.push(frame);
      return;
    }
    if (this.positions.accept(frame.topic, frame.seq)) this._hand(frame.topic, subscription, frame);
  }

  _hand(topic, subscription, frame) {
    const { seq } = frame;
    const message = {
      topic, seq, id: frame.id, time: frame.time, event: frame.event, data: frame.data,
      ack: () => this.ack(topic, seq),
    };
    let result;
    try {
      result = subscription.handler(message);
    } catch (error) {
      this._emit("error", { code: "handler", message: String(error), topic, seq, error });
      return;
    }
    if (!subscription.autoAck || seq === null) return;
    if (result && typeof result.then === "function") {
      result.then(() => this.ack(topic, seq), (error) => {
        this._emit("error", { code: "handler", message: String(error), topic, seq, error });
      });
    } else {
      this.ack(topic, seq);
    }
  }

  _onUnsubscribedByServer(topic) {
    // A refreshed token no longer allows the topic.
    if (!this.subscriptions.delete(topic)) return;
    this.positions.forget(topic);
    this._emit("unsubscribed", { topic });
  }

  _onPong(ref) {
    const topics = this.settling.get(ref);
    if (topics === undefined) return;
    this.settling.delete(ref);
    for (const topic of topics) {
      const subscription = this.subscriptions.get(topic);
      if (subscription && subscription.confirmed && subscription.head !== null) {
        this.positions.settle(topic, subscription.head);
      }
    }
  }

  // Sending

  _send(frame) {
    if (this.socket === null || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  _request(frame, extra = {}) {
    const ref = ++this.refs;
    return new Promise((resolve, reject) => {
      if (!this._send({ ...frame, ref })) {
        reject(new NotifierError("disconnected", "not connected"));
        return;
      }
      this.pending.set(ref, { resolve, reject, ...extra });
    });
  }

  _flushAcks() {
    if (this.state !== "open") return;
    for (const [topic, seq] of this.acks) {
      const subscription = this.subscriptions.get(topic);
      // A resumed topic's seq is sent only once its epoch is confirmed.
      if (subscription && !subscription.confirmed) continue;
      this._send({ type: "ack", topic, seq });
      this.acks.delete(topic);
    }
  }

  // Token refresh

  _scheduleRefresh(expires) {
    this._clear("refresh");
    if (typeof this.options.getToken !== "function" || !Number.isFinite(expires)) return;
    const remaining = expires * 1000 - Date.now();
    const delay = Math.max(0, remaining - Math.min(this.options.refreshBefore, remaining / 2));
    this.timers.refresh = setTimeout(() => this._refresh(expires), delay);
  }

  async _refresh(expires) {
    const generation = this.generation;
    const retry = () => {
      if (generation !== this.generation) return;
      const remaining = expires * 1000 - Date.now();
      this.timers.refresh = setTimeout(() => this._refresh(expires), Math.max(1000, remaining / 2));
    };
    let token;
    try {
      token = await this._fetchToken();
    } catch (error) {
      this._emit("error", { code: "token", message: `getToken failed: ${error}`, error });
      retry();
      return;
    }
    if (generation !== this.generation || this.state !== "open") return;
    if (!token) {
      this._stop(CLOSE_UNAUTHORIZED, "no token");
      return;
    }
    // The authenticated frame schedules the next refresh.
    this._request({ type: "auth", token }).catch((error) => {
      if (error.code === "disconnected") return;
      this._emit("error", { code: error.code, message: error.message });
      retry();
    });
  }

  // Liveness: any frame is a sign of life; after pingInterval of silence a
  // ping goes out, and pongTimeout without an answer closes the socket.

  _watch() {
    this._clear("ping");
    const { pingInterval, pongTimeout } = this.options;
    const now = performance.now();
    if (this.pingSentAt !== null && now - this.pingSentAt >= pongTimeout) {
      this._abandon(`no answer within ${pongTimeout / 1000} s`, true);
      return;
    }
    if (this.pingSentAt === null && now - this.lastSeen >= pingInterval) {
      this._send({ type: "ping" });
      this.pingSentAt = now;
    }
    const due = this.pingSentAt !== null ? this.pingSentAt + pongTimeout : this.lastSeen + pingInterval;
    this.timers.ping = setTimeout(() => this._watch(), Math.max(0, due - now));
  }

  /** Check the connection now (tab visible again, gone offline). */
  _checkNow() {
    if (this.state !== "open" || this.pingSentAt !== null) return;
    this._send({ type: "ping" });
    this.pingSentAt = performance.now();
    this._watch();
  }

  _wake() {
    if (this.state === "closed") {
      this._clear("reconnect");
      this._open();
    } else {
      this._checkNow();
    }
  }

  // Closing

  /** Give up on the socket now (it answers nothing, so waiting for its close
   * handshake would wait for nothing) and go on as if it had closed. */
  _abandon(reason, opened) {
    const socket = this.socket;
    if (socket === null) return;
    this._detach();
    socket.close(CLOSE_NO_ANSWER, reason);
    this._closed(CLOSE_NO_ANSWER, reason, opened);
  }

  _detach() {
    const socket = this.socket;
    if (socket === null) return;
    socket.onopen = socket.onmessage = socket.onclose = null;
    this.socket = null;
  }

  _closed(code, reason, opened) {
    this._detach();
    this.generation++;
    for (const name of ["connect", "ping", "refresh", "stable", "ack"]) this._clear(name);
    for (const { reject } of this.pending.values()) {
      reject(new NotifierError("disconnected", "the connection closed before the reply"));
    }
    this.pending.clear();
    this.settling.clear();
    for (const subscription of this.subscriptions.values()) subscription.confirmed = false;
    if (this.stopped) return;
    if (code === CLOSE_FORBIDDEN) {
      this._stop(code, reason);
      return;
    }
    if (typeof this.options.getToken !== "function") {
      const expiry = tokenExpiry(this.token);
      if (code === CLOSE_UNAUTHORIZED && expiry !== null && expiry <= Date.now()) {
        this._stop(code, reason); // and no way to get another
        return;
      }
    } else if (code === CLOSE_UNAUTHORIZED || !opened) {
      // Expired or revoked; a refused handshake looks like a network error
      // to a page, and may have been a refused token too.
      this.needFreshToken = true;
    }
    const delay = backoffDelay(this.attempt, this.options.backoff);
    const attempt = this.attempt++;
    this._setState("closed", { code, reason, reconnect: true, delay, attempt });
    this.timers.reconnect = setTimeout(() => {
      delete this.timers.reconnect;
      this._open();
    }, delay);
  }

  _stop(code, reason) {
    this.stopped = true;
    if (this.state === "stopped" || this.state === "idle") return;
    this._clear("reconnect");
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    document.removeEventListener("visibilitychange", this.onVisibility);
    const socket = this.socket;
    if (socket !== null) {
      this._detach();
      socket.close(code === CLOSE_FORBIDDEN ? 1000 : code, reason);
    }
    this._closed(code, reason, true);
    this._setState("stopped", { code, reason, reconnect: false });
  }

  // Events and timers

  _setState(state, detail) {
    this.state = state;
    if (state === "open") this._watch();
    this._emit(state === "stopped" ? "closed" : state, detail);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _clear(name) {
    if (this.timers[name] !== undefined) {
      clearTimeout(this.timers[name]);
      delete this.timers[name];
    }
  }
}
