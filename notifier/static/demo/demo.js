// The demo page: notifier.js and a list. Everything the page knows about
// the connection comes from the client's events.
import { NotifierClient } from "../static/notifier.js";

const FEED_LIMIT = 200;
const TOKEN_KEY = "notifier-demo-token";

const $ = (id) => document.getElementById(id);
const form = $("connect-form");
const tokenInput = $("token");
const topicsInput = $("topics");
const disconnectButton = $("disconnect");
const state = $("state");
const stateText = $("state-text");
const notice = $("notice");
const feed = $("feed");
const empty = $("empty");
const count = $("count");
const announcer = $("announcer");

let client = null;
let shown = 0;
let unannounced = [];

function setState(name, text) {
  state.dataset.state = name;
  stateText.textContent = text;
  disconnectButton.disabled = name === "idle" || name === "stopped";
}

function showNotice(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

function topicsFrom(text) {
  return [...new Set(text.split(",").map((topic) => topic.trim()).filter(Boolean))];
}

function formatTime(iso) {
  const time = new Date(iso);
  const today = new Date().toDateString() === time.toDateString();
  return today ? time.toLocaleTimeString() : time.toLocaleString();
}

/** [the line to read first, the rest of the data or undefined]: a string,
 * or an object's text-like field; [null, data] for anything else. */
function headline(data) {
  if (typeof data === "string") return [data, undefined];
  if (data && typeof data === "object" && !Array.isArray(data)) {
    for (const key of ["title", "text", "message", "body"]) {
      if (typeof data[key] === "string") {
        const { [key]: text, ...rest } = data;
        return [text, Object.keys(rest).length ? rest : undefined];
      }
    }
  }
  return [null, data];
}

function render(message) {
  const item = document.createElement("li");
  item.className = "note";
  item.dataset.id = message.id;
  item.dataset.topic = message.topic;
  item.dataset.seq = message.seq ?? "";

  const head = document.createElement("div");
  head.className = "note-head";
  const topic = document.createElement("span");
  topic.className = "topic";
  topic.textContent = message.topic;
  head.append(topic);
  if (message.event) {
    const event = document.createElement("span");
    event.className = "event";
    event.textContent = message.event;
    head.append(event);
  }
  const time = document.createElement("time");
  time.dateTime = message.time;
  time.title = message.time;
  time.textContent = formatTime(message.time);
  head.append(time);
  item.append(head);

  const [text, rest] = headline(message.data);
  if (text !== null) {
    const line = document.createElement("p");
    line.className = "text";
    line.textContent = text;
    item.append(line);
  }
  if (rest !== undefined) {
    const data = document.createElement("pre");
    data.className = "data";
    data.textContent = JSON.stringify(rest);
    item.append(data);
  }
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = message.seq === null ? "ephemeral" : `seq ${message.seq}`;
  item.append(meta);
  return item;
}

function show(message) {
  feed.prepend(render(message));
  while (feed.children.length > FEED_LIMIT) feed.lastElementChild.remove();
  shown += 1;
  count.textContent = String(shown);
  empty.hidden = true;
  announce(message);
}

// A replay can bring dozens at once: one announcement per burst.
function announce(message) {
  unannounced.push(message);
  if (unannounced.length > 1) return;
  setTimeout(() => {
    const [first] = unannounced;
    announcer.textContent = unannounced.length === 1
      ? `New notification on ${first.topic}${first.event ? `: ${first.event}` : ""}`
      : `${unannounced.length} new notifications`;
    unannounced = [];
  }, 400);
}

function showHowto(user) {
  const body = JSON.stringify({ user, data: { text: "hello" } });
  $("curl").textContent = `curl -H "Authorization: Bearer $KEY" \\\n     -d '${body}' \\\n     ${location.origin}/api/publish`;
  $("howto").hidden = false;
}

function start(token, topics) {
  if (client !== null) client.close();
  showNotice("");
  const current = new NotifierClient({ token });
  client = current;
  let personal = false;
  current.addEventListener("connecting", ({ detail }) => {
    if (client !== current) return;
    setState("connecting", detail.attempt ? `Reconnecting (attempt ${detail.attempt})…` : "Connecting…");
  });
  current.addEventListener("open", ({ detail }) => {
    if (client !== current) return;
    setState("open", `Connected as ${detail.user}`);
    showNotice("");
    if (!personal) {
      personal = true;
      current.subscribe(current.personalTopic, show);
      showHowto(detail.user);
    }
  });
  current.addEventListener("closed", ({ detail }) => {
    if (client !== current) return;
    const why = `${detail.code}${detail.reason ? ` ${detail.reason}` : ""}`;
    if (detail.reconnect) {
      setState("closed", `Connection lost (${why}); retrying in ${(detail.delay / 1000).toFixed(1)} s`);
    } else {
      setState("stopped", `Disconnected (${why})`);
      if (detail.code === 4001) showNotice("The token has expired or was refused: paste a new one.");
      if (detail.code === 4003) showNotice("This page's origin is not allowed (server.allowed_origins).");
    }
  });
  current.addEventListener("error", ({ detail }) => {
    if (client !== current) return;
    showNotice(detail.topic ? `${detail.topic}: ${detail.message}` : detail.message);
  });
  for (const topic of topics) current.subscribe(topic, show);
  current.connect();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = tokenInput.value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  start(token, topicsFrom(topicsInput.value));
});

disconnectButton.addEventListener("click", () => {
  if (client !== null) client.close();
});

$("clear").addEventListener("click", () => {
  feed.replaceChildren();
  shown = 0;
  count.textContent = "0";
  empty.hidden = false;
});

// ?token=...&topic=a,b (or topic=a&topic=b). The token leaves the address
// bar at once, so it is not kept in history or shared with the URL; the tab
// remembers it for a reload.
const params = new URLSearchParams(location.search);
const fromQuery = params.get("token");
if (fromQuery) {
  sessionStorage.setItem(TOKEN_KEY, fromQuery);
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}
tokenInput.value = fromQuery || sessionStorage.getItem(TOKEN_KEY) || "";
topicsInput.value = params.getAll("topic").join(", ");
if (tokenInput.value) start(tokenInput.value, topicsFrom(topicsInput.value));
