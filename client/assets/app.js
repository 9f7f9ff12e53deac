// The blog UI: posts with their comments, live, plus a view of the events
// that make it so. Plain JavaScript with no build step; it calls the same
// relative routes as the original React client (POST /posts/create,
// POST /posts/{id}/comments) and a few more:
//   GET /posts?limit=N&before=CURSOR  one page of posts, newest first (the page
//                      loads the first and more on demand, never the whole view)
//   GET /posts/stream  server-sent events from query, after each change of the view
//   GET /api/flow      the bus's events as they are stored and delivered (via the client server)
//   GET /api/status    each service's health and each subscriber's progress
// The DOM is updated in place, keyed by id, so a live update never throws
// away what someone is typing. Text only ever goes in through textContent.
"use strict";

const POLL_MS = 2000;
const PAGE_SIZE = 20;
/** Reloads asked for within this long are done once. */
const RELOAD_DEBOUNCE_MS = 250;
/** Posts remembered as having comments that arrived before the post. */
const ORPHANS_KEPT = 500;
const STATUS_MS = 3000;
const FLOW_ROWS = 60;
const RANK = { pending: 0, approved: 1, rejected: 1 };
const STATUS_LABEL = { pending: "Awaiting moderation", approved: "Approved", rejected: "Rejected" };

const $ = (id) => document.getElementById(id);
const postsEl = $("posts");
const postsState = $("posts-state");

/** id -> { post, card, list, empty, summary, comments: Map(id -> {comment, item}) } */
const posts = new Map();
let loaded = false;
/** The cursor of the next older page; null once the oldest post is shown. */
let nextCursor = null;
/** Posts we heard comments about before knowing the post. */
const orphans = new Set();

// ---------- small helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** An id safe for use in element ids. */
function domId(prefix, id) {
  return `${prefix}-${String(id).replace(/[^A-Za-z0-9_-]/g, "_")}`;
}

function parse(text) {
  try { return JSON.parse(text); } catch { return null; }
}

function truncate(text, max) {
  const s = String(text ?? "");
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, body) {
  const init = body === undefined
    ? { headers: { Accept: "application/json" } }
    : { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError("The server could not be reached. Check your connection and try again.", 0);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError((data && data.error) || `The server answered ${response.status}.`, response.status);
  return data;
}

/** Tells screen reader users about changes they did not cause themselves. */
function announce(message) {
  const region = $("announcer");
  region.append(el("p", {}, message));
  while (region.childElementCount > 5) region.firstElementChild.remove();
}

function showFieldError(input, error, message) {
  error.textContent = message;
  error.hidden = false;
  input.setAttribute("aria-invalid", "true");
}

function clearFieldError(input, error) {
  error.textContent = "";
  error.hidden = true;
  input.removeAttribute("aria-invalid");
}

// ---------- posts and comments ----------

function commentItem(postId, comment) {
  const item = el("li", { class: "comment", "data-comment-id": comment.id });
  renderComment(item, postId, comment);
  return item;
}

function renderComment(item, postId, comment) {
  const status = comment.status in STATUS_LABEL ? comment.status : "pending";
  item.dataset.status = status;
  const badge = el("span", { class: `badge badge-${status}` }, STATUS_LABEL[status]);
  if (status === "rejected") {
    const textId = domId("rejected", `${postId}-${comment.id}`);
    const text = el("p", { class: "comment-text", id: textId, hidden: true }, comment.content);
    const reveal = el("button", { type: "button", class: "reveal", "aria-expanded": "false", "aria-controls": textId }, "Show text");
    reveal.addEventListener("click", () => {
      const open = text.hidden;
      text.hidden = !open;
      reveal.setAttribute("aria-expanded", String(open));
      reveal.textContent = open ? "Hide text" : "Show text";
    });
    item.replaceChildren(el("div", { class: "comment-head" }, badge, el("span", { class: "muted" }, "Hidden by moderation"), reveal), text);
  } else {
    item.replaceChildren(el("div", { class: "comment-head" }, badge), el("p", { class: "comment-text" }, comment.content));
  }
}

function postCard(post) {
  const titleId = domId("post-title", post.id);
  const inputId = domId("comment-input", post.id);
  const errorId = domId("comment-error", post.id);
  const list = el("ul", { class: "comments", "aria-label": `Comments on ${post.title}` });
  const empty = el("p", { class: "empty" }, "No comments yet.");
  const summary = el("span", { class: "muted post-summary" });
  const input = el("input", { id: inputId, name: "content", autocomplete: "off", placeholder: "Write a comment", "aria-describedby": errorId });
  const error = el("p", { class: "field-error", id: errorId, role: "alert", hidden: true });
  const button = el("button", { type: "submit", class: "secondary" }, "Add comment");
  const form = el("form", { class: "comment-form", novalidate: true, "data-post-id": post.id },
    el("label", { for: inputId }, "Add a comment"), el("div", { class: "field-row" }, input, button), error);
  form.addEventListener("submit", (event) => submitComment(event, post.id, input, error, button));
  input.addEventListener("input", () => clearFieldError(input, error));
  const card = el("article", { class: "card post", "data-post-id": post.id, "aria-labelledby": titleId },
    el("header", { class: "post-head" }, el("h3", { id: titleId }, post.title), summary), list, empty, form);
  return { post: { id: post.id, title: post.title }, card, list, empty, summary, comments: new Map() };
}

/** Adds a post if it is new (at the top, or before `before`, or last when
 * `before` is null); returns its entry. */
function upsertPost(post, { fresh = false, before = postsEl.firstElementChild } = {}) {
  let entry = posts.get(post.id);
  if (!entry) {
    entry = postCard(post);
    posts.set(post.id, entry);
    postsEl.insertBefore(entry.card, before);
    if (fresh) {
      entry.card.classList.add("arrived");
      entry.card.addEventListener("animationend", () => entry.card.classList.remove("arrived"), { once: true });
    }
    if (loaded && fresh) announce(`New post: ${post.title}`);
    updateSummary(entry);
    updatePostsState();
  }
  for (const comment of post.comments || []) upsertComment(entry, comment, { quiet: !loaded });
  return entry;
}

/** Adds or advances a comment; a status never goes back to pending. */
function upsertComment(entry, comment, { quiet = false, own = false } = {}) {
  const known = entry.comments.get(comment.id);
  if (!known) {
    const item = commentItem(entry.post.id, comment);
    entry.comments.set(comment.id, { comment: { ...comment }, item });
    entry.list.append(item);
    if (!quiet && !own) announce(`New comment on “${entry.post.title}”, ${STATUS_LABEL[comment.status] || comment.status}.`);
  } else if (known.comment.status !== comment.status && (RANK[comment.status] ?? 0) >= (RANK[known.comment.status] ?? 0)) {
    known.comment = { ...comment };
    renderComment(known.item, entry.post.id, comment);
    known.item.classList.add("changed");
    known.item.addEventListener("animationend", () => known.item.classList.remove("changed"), { once: true });
    if (!quiet) announce(`Comment on “${entry.post.title}” ${comment.status}.`);
  } else {
    return;
  }
  updateSummary(entry);
}

function updateSummary(entry) {
  const all = [...entry.comments.values()].map((c) => c.comment.status);
  const pending = all.filter((s) => s === "pending").length;
  entry.empty.hidden = all.length > 0;
  let text = all.length === 1 ? "1 comment" : `${all.length} comments`;
  if (pending > 0) text += ` · ${pending} awaiting moderation`;
  entry.summary.textContent = text;
}

function updatePostsState(error) {
  const count = posts.size;
  $("posts-count").textContent = count === 0 ? "" : count === 1 ? "1 post" : `${count} posts`;
  if (error && !loaded) {
    const retry = el("button", { type: "button", class: "secondary" }, "Try again");
    retry.addEventListener("click", () => { setPostsState("loading", [el("p", {}, "Loading posts…")]); reload(); });
    setPostsState("error", [el("p", {}, `Could not load posts: ${error}`), retry]);
  } else if (!loaded) {
    return;
  } else if (count === 0) {
    setPostsState("empty", [el("p", { class: "empty-title" }, "No posts yet"), el("p", {}, "Write the first one above; it will appear here, and in every other open browser, as soon as query hears of it.")]);
  } else {
    setPostsState("ready", []);
  }
}

function setPostsState(state, children) {
  postsState.dataset.state = state;
  postsState.hidden = state === "ready";
  postsState.replaceChildren(...children);
}

/** One page of posts, newest first: `{posts, next}`. */
function fetchPage(before) {
  const query = before === null ? `limit=${PAGE_SIZE}` : `limit=${PAGE_SIZE}&before=${encodeURIComponent(before)}`;
  return api(`/posts?${query}`);
}

/** Merges the first page into the list, which stays newest first. */
function mergeFirstPage(page) {
  const list = page.posts || [];
  const known = list.some((post) => posts.has(post.id));
  if (!known && posts.size > 0 && page.next !== null) {
    // More new posts than a page while we were away: start over rather than
    // leave a gap that "Load more" would never fill.
    posts.clear();
    postsEl.replaceChildren();
  }
  if (!loaded || posts.size === 0) nextCursor = page.next;
  // Cards above the first known post of the page are newer than the page
  // (they arrived live after it was read), so the page goes below them.
  const ids = new Set(list.map((post) => post.id));
  let anchor = [...postsEl.children].find((card) => ids.has(card.dataset.postId)) || null;
  for (const post of list) {
    const entry = upsertPost(post, { fresh: loaded, before: anchor });
    if (entry.card === anchor) {
      anchor = anchor.nextElementSibling;
    } else if (entry.card.nextElementSibling !== anchor) {
      postsEl.insertBefore(entry.card, anchor);
    }
  }
}

function updateLoadMore() {
  const button = $("load-more");
  button.hidden = !loaded || nextCursor === null;
}

/** Appends the next older page. */
async function loadMore() {
  const button = $("load-more");
  const error = $("load-more-error");
  if (nextCursor === null || button.disabled) return;
  button.disabled = true;
  error.hidden = true;
  try {
    const page = await fetchPage(nextCursor);
    for (const post of page.posts || []) upsertPost(post, { before: null });
    nextCursor = page.next;
    updatePostsState();
  } catch (e) {
    error.textContent = `Could not load more posts: ${e.message}`;
    error.hidden = false;
  } finally {
    button.disabled = false;
    updateLoadMore();
  }
}

let reloading = null;
let reloadAgain = false;
let reloadTimer = null;

/** Brings the first page up to date; a reload asked for while one runs
 * runs once more after it. */
async function reload() {
  if (reloading !== null) {
    reloadAgain = true;
    return reloading;
  }
  reloading = loadFirstPage();
  try {
    return await reloading;
  } finally {
    reloading = null;
    if (reloadAgain) {
      reloadAgain = false;
      scheduleReload();
    }
  }
}

/** A reload soon: whatever asks for one within the debounce gets one. */
function scheduleReload(delay = RELOAD_DEBOUNCE_MS) {
  if (reloadTimer !== null) return;
  reloadTimer = setTimeout(() => { reloadTimer = null; reload(); }, delay);
}

async function loadFirstPage() {
  try {
    mergeFirstPage(await fetchPage(null));
    loaded = true;
    document.documentElement.dataset.loaded = "true";
    updatePostsState();
    updateLoadMore();
    if (liveMode === "offline") setLiveMode(stream && stream.readyState === EventSource.OPEN ? "live" : "polling");
    return true;
  } catch (error) {
    updatePostsState(error.message);
    if (loaded) setLiveMode("offline");
    return false;
  }
}

async function submitComment(event, postId, input, error, button) {
  event.preventDefault();
  clearFieldError(input, error);
  button.disabled = true;
  try {
    const list = await api(`/posts/${encodeURIComponent(postId)}/comments`, { content: input.value });
    input.value = "";
    const entry = posts.get(postId);
    for (const comment of list || []) upsertComment(entry, comment, { own: true });
    announce("Comment added, awaiting moderation.");
  } catch (e) {
    showFieldError(input, error, e.message);
    input.focus();
  } finally {
    button.disabled = false;
  }
}

function setupCreatePost() {
  const form = $("create-post");
  const input = $("post-title");
  const error = $("post-error");
  const button = $("create-post-submit");
  input.addEventListener("input", () => clearFieldError(input, error));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldError(input, error);
    button.disabled = true;
    try {
      const post = await api("/posts/create", { title: input.value });
      input.value = "";
      upsertPost({ id: post.id, title: post.title, comments: [] }, { fresh: true });
      announce(`Post “${post.title}” created.`);
    } catch (e) {
      showFieldError(input, error, e.message);
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
}

// ---------- live updates: the query stream, polling as the fallback ----------

let stream = null;
let pollTimer = null;
let liveMode = "connecting";

function setLiveMode(mode) {
  liveMode = mode;
  const label = { connecting: "Connecting…", live: "Live", polling: `Reconnecting · polling every ${POLL_MS / 1000} s`, offline: "Offline · retrying" }[mode];
  $("live-status").dataset.mode = mode;
  $("live-status-text").textContent = label;
}

function startPolling() {
  if (pollTimer === null) pollTimer = setInterval(reload, POLL_MS);
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
}

function connectStream() {
  if (!("EventSource" in window)) {
    setLiveMode("polling");
    startPolling();
    return;
  }
  const source = new EventSource("/posts/stream");
  stream = source;
  source.onopen = () => {
    setLiveMode("live");
    stopPolling();
    reload(); // whatever happened while we were away
  };
  source.onerror = () => {
    if (liveMode !== "offline") setLiveMode("polling");
    startPolling();
    if (source.readyState === EventSource.CLOSED) {
      // The browser gives up on an answer that is not a stream; we do not.
      stream = null;
      setTimeout(connectStream, 5000);
    }
  };
  source.addEventListener("PostCreated", (e) => {
    const data = parse(e.data);
    if (!data || !data.id) return;
    upsertPost({ id: data.id, title: data.title, comments: [] }, { fresh: true });
    // Its comments came first and were not shown: the first page has them.
    if (orphans.delete(data.id)) scheduleReload();
  });
  const onComment = (e) => {
    const data = parse(e.data);
    if (!data || !data.id) return;
    const entry = posts.get(data.postId);
    if (entry) {
      upsertComment(entry, { id: data.id, content: data.content, status: data.status });
      return;
    }
    // A post on a page not loaded (it shows when loaded), or one not created
    // yet: remember it, and reload once if it turns up.
    orphans.add(data.postId);
    if (orphans.size > ORPHANS_KEPT) orphans.delete(orphans.values().next().value);
  };
  source.addEventListener("CommentCreated", onComment);
  source.addEventListener("CommentUpdated", onComment);
  // The server dropped changes this page was too slow to take.
  source.addEventListener("resync", () => scheduleReload(0));
}

// ---------- the event flow panel ----------

const flowRows = new Map(); // seq -> { item, deliveries, subscribers: Set }

function setFlowState(state) {
  $("flow-panel").dataset.state = state;
  $("flow-state").textContent = state;
}

function flowSummary(type, data) {
  if (!data || typeof data !== "object") return "";
  if (type === "PostCreated") return `“${truncate(data.title, 48)}”`;
  const content = `“${truncate(data.content, 36)}”`;
  if (type === "CommentCreated") {
    const entry = posts.get(data.postId);
    return entry ? `${content} on “${truncate(entry.post.title, 28)}”` : `${content}, a new comment`;
  }
  if (type === "CommentModerated") return `${content} judged ${data.status}`;
  if (type === "CommentUpdated") return `${content} is now ${data.status}`;
  return "";
}

function flowRow(record) {
  const seq = Number(record.seq);
  let row = flowRows.get(seq);
  if (!row) {
    const type = String(record.type || "event");
    const summary = el("p", { class: "flow-summary" });
    const deliveries = el("ul", { class: "deliveries", "aria-label": "Received by" });
    const item = el("li", { class: "flow-item", "data-seq": seq, "data-type": type },
      el("div", { class: "flow-head" }, el("span", { class: "seq" }, `#${seq}`), el("span", { class: `chip type-${type.replace(/[^A-Za-z]/g, "")}` }, type)),
      summary, deliveries);
    row = { item, summary, deliveries, subscribers: new Set() };
    flowRows.set(seq, row);
    const list = $("flow");
    const after = [...list.children].find((child) => Number(child.dataset.seq) < seq);
    list.insertBefore(item, after || null);
    while (list.childElementCount > FLOW_ROWS) {
      const last = list.lastElementChild;
      flowRows.delete(Number(last.dataset.seq));
      last.remove();
    }
    $("flow-empty").hidden = true;
  }
  if (record.data && !row.summary.textContent) row.summary.textContent = flowSummary(record.type, record.data);
  return row;
}

function addDelivery(row, record) {
  const name = String(record.subscriber || "?");
  if (row.subscribers.has(name)) return;
  row.subscribers.add(name);
  const lag = Number.isFinite(record.lagMs) ? `${Math.max(0, Math.round(record.lagMs))} ms` : "";
  const item = el("li", { class: "delivery", "data-subscriber": name, "data-lag-ms": record.lagMs ?? "" },
    name, el("span", { class: "lag" }, lag));
  // Alphabetical, so every row lists the subscribers in the same place.
  const next = [...row.deliveries.children].find((child) => child.dataset.subscriber > name);
  row.deliveries.insertBefore(item, next || null);
}

function connectFlow() {
  if (!("EventSource" in window)) { setFlowState("unavailable"); return; }
  const source = new EventSource("/api/flow");
  source.onopen = () => setFlowState("live");
  source.onerror = () => {
    setFlowState("reconnecting");
    if (source.readyState === EventSource.CLOSED) setTimeout(connectFlow, 3000);
  };
  source.addEventListener("published", (e) => {
    const record = parse(e.data);
    if (record && record.seq !== undefined) flowRow(record);
  });
  source.addEventListener("delivered", (e) => {
    const record = parse(e.data);
    if (record && record.seq !== undefined) addDelivery(flowRow(record), record);
  });
}

// ---------- the status view ----------

async function refreshStatus() {
  let body = null;
  let problem = null;
  try {
    const response = await fetch("/api/status", { headers: { Accept: "application/json" } });
    body = await response.json().catch(() => null);
    if (!response.ok) problem = (body && body.error) || `status answered ${response.status}`;
  } catch {
    problem = "the client server could not be reached";
  }
  const services = (body && body.services) || [];
  $("services").replaceChildren(...services.map((s) =>
    el("li", { class: "service", "data-service": s.name, "data-healthy": String(Boolean(s.healthy)) },
      el("span", { class: "dot", "aria-hidden": "true" }), el("span", { class: "service-name" }, s.name),
      el("span", { class: "service-state" }, s.healthy ? "up" : "down"))));
  const error = $("status-error");
  error.hidden = problem === null;
  error.textContent = problem ? `Status: ${problem}.` : "";
  const bus = body && body.bus;
  const rows = ((bus && bus.subscribers) || []).map((s) => {
    const state = s.failing ? "failing" : s.lag > 0 ? "catching up" : "in sync";
    return el("tr", { "data-subscriber": s.name, "data-failing": String(Boolean(s.failing)) },
      el("th", { scope: "row" }, el("span", { class: `dot ${s.failing ? "bad" : s.lag > 0 ? "warn" : "good"}`, "aria-hidden": "true" }), s.name,
        el("span", { class: "visually-hidden" }, `, ${state}`)),
      el("td", {}, `${s.cursor ?? "–"}/${bus.head ?? "–"}`), el("td", {}, String(s.lag ?? "–")),
      el("td", {}, String(s.delivered ?? "–")), el("td", {}, String(s.retries ?? "–")));
  });
  $("subscribers").tBodies[0].replaceChildren(...rows);
  $("status-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// ---------- start ----------

setupCreatePost();
$("load-more").addEventListener("click", loadMore);
setLiveMode("connecting");
reload().then(() => connectStream());
connectFlow();
refreshStatus();
setInterval(() => { if (!document.hidden) refreshStatus(); }, STATUS_MS);
