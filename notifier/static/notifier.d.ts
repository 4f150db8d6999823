// Types for notifier.js, the browser client notifier serves at /static/notifier.js.

/** Closes this client decides itself: no welcome, or no answer to a ping, in time. */
export declare const CLOSE_NO_ANSWER: 4000;
/** The server's close for an expired or revoked token; also reported when no token can be had. */
export declare const CLOSE_UNAUTHORIZED: 4001;
/** The server's close for a refused Origin; the client stops for good. */
export declare const CLOSE_FORBIDDEN: 4003;

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Message {
  topic: string;
  /** null for an ephemeral message (never stored, never replayed). */
  seq: number | null;
  id: string;
  /** RFC 3339 UTC, with milliseconds. */
  time: string;
  event: string | null;
  data: Json;
  /** Store the user's cursor at this message (no-op for ephemeral ones). */
  ack(): void;
}

/** Returning a promise delays the automatic ack until it resolves. */
export type Handler = (message: Message) => void | Promise<unknown>;

export interface Position {
  /** The last seq handed to the app; null when none was yet. */
  seq: number | null;
  /** The epoch of the log that seq belongs to; null when not known yet. */
  epoch: string | null;
}

export interface BackoffOptions {
  /** Milliseconds; the first retry waits up to this long. Default 500. */
  base?: number;
  /** Upper bound of the window, in milliseconds. Default 30000. */
  max?: number;
  /** A connection open this long resets the window to `base`. Default 10000. */
  stableAfter?: number;
}

export interface ClientOptions {
  /** ws(s):// or http(s):// URL of /ws. Default: /ws on the server that served notifier.js. */
  url?: string;
  /** A fixed token. The client stops for good once it has expired. */
  token?: string;
  /** Called for the first token, again before each token expires, after a
   * 4001 close and after a refused handshake. Resolving to null (or "")
   * stops the client for good; throwing counts as a failed attempt. */
  getToken?: () => string | null | Promise<string | null>;
  /** Ack each stored message once its handler has returned (or its promise
   * resolved). Default true; per topic with subscribe's `autoAck`. */
  autoAck?: boolean;
  backoff?: BackoffOptions;
  /** Send a ping after this many milliseconds without a frame. Default 25000. */
  pingInterval?: number;
  /** Give up on a socket that sends nothing this long after a ping. Default 10000. */
  pongTimeout?: number;
  /** Give up on a connection whose welcome takes longer. Default 15000. */
  connectTimeout?: number;
  /** Refresh this long before `expires` (at most half the token's remaining life). Default 60000. */
  refreshBefore?: number;
  /** Acks are coalesced per topic for this many milliseconds. Default 100. */
  ackDelay?: number;
  /** Personal-topic messages kept until the app subscribes to it; more are fetched again. Default 1000. */
  holdLimit?: number;
}

export interface SubscribeOptions {
  /** Replay every retained message after this seq. */
  since?: number;
  /** The epoch `since` belongs to (from position() or a "subscribed" event). */
  epoch?: string;
  autoAck?: boolean;
}

export interface PublishOptions {
  event?: string;
  /** Delivered to current subscribers only, never stored. */
  ephemeral?: boolean;
}

export interface Published {
  topic: string;
  seq: number | null;
  id: string;
}

export type State = "idle" | "connecting" | "open" | "closed" | "stopped";

export interface ConnectingDetail {
  /** 0 for the first connection; then which reconnect in a row this is
   * (1, 2, ...), counted from the last connection that stayed up `stableAfter`. */
  attempt: number;
}

export interface OpenDetail {
  user: string;
  connection: string;
  /** The token's expiry, in Unix seconds. */
  expires: number;
}

export interface ClosedDetail {
  code: number;
  reason: string;
  /** false: stopped for good (close(), 4003, no token, a fixed token expired). */
  reconnect: boolean;
  /** With reconnect: milliseconds until the next attempt, drawn from the
   * backoff window of `attempt` (0 right after a stable connection). */
  delay?: number;
  attempt?: number;
}

export interface SubscribedDetail {
  topic: string;
  /** The topic's head. */
  seq: number;
  epoch: string;
  /** false: messages after the requested position had already been removed. */
  recovered: boolean;
  /** true: the log was reset (a new epoch); the topic starts over. */
  reset: boolean;
}

export interface ErrorDetail {
  /** A server error code (forbidden, rate_limited, ...), "handler" when a
   * handler threw, or "token" when getToken failed. */
  code: string;
  message: string;
  topic?: string;
  seq?: number | null;
  error?: unknown;
}

export interface ClientEvents {
  connecting: CustomEvent<ConnectingDetail>;
  open: CustomEvent<OpenDetail>;
  closed: CustomEvent<ClosedDetail>;
  subscribed: CustomEvent<SubscribedDetail>;
  /** The server ended a subscription: a refreshed token no longer allows it. */
  unsubscribed: CustomEvent<{ topic: string }>;
  authenticated: CustomEvent<{ expires: number }>;
  error: CustomEvent<ErrorDetail>;
}

export declare class NotifierClient extends EventTarget {
  constructor(options: ClientOptions);
  readonly url: string;
  readonly state: State;
  /** The token's `sub`, from the first welcome on. */
  readonly user: string | null;
  /** `user:<sub>`, which the server subscribes on every connection (the offline queue). */
  readonly personalTopic: string | null;
  connect(): void;
  /** Stop for good; pending acks go out first. */
  close(): void;
  subscribe(topic: string, handler: Handler, options?: SubscribeOptions): void;
  unsubscribe(topic: string): Promise<void>;
  publish(topic: string, data: Json, options?: PublishOptions): Promise<Published>;
  ack(topic: string, seq: number): void;
  position(topic: string): Position | undefined;
  addEventListener<K extends keyof ClientEvents>(
    type: K, listener: (event: ClientEvents[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(
    type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof ClientEvents>(
    type: K, listener: (event: ClientEvents[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(
    type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions): void;
}

/** An error frame from the server, or "disconnected" / "not_connected". */
export declare class NotifierError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
}

/** Full jitter: uniform in [0, min(max, base * 2^attempt)). */
export declare function backoffDelay(
  attempt: number, options: { base: number; max: number }, random?: () => number): number;

/** The per-topic dedupe and resume state the client keeps. */
export declare class Positions {
  get(topic: string): Position | undefined;
  start(topic: string, seq: number, epoch?: string | null): void;
  forget(topic: string): void;
  /** Returns true when the log was reset (new epoch, or head below the position). */
  subscribed(topic: string, epoch: string, head: number): boolean;
  /** Whether a message is new; moves the position when it is. */
  accept(topic: string, seq: number | null): boolean;
  settle(topic: string, head: number): void;
}
