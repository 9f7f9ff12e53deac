// The blog UI: lists posts with their comments and lets you add both.
// It calls the same relative routes as the original React client.
"use strict";

const postsEl = document.getElementById("posts");
const stateEl = document.getElementById("posts-state");

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `request failed (${response.status})`);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function commentText(comment) {
  if (comment.status === "pending") return "This comment is awaiting moderation";
  if (comment.status === "rejected") return "This comment has been rejected";
  return comment.content;
}

function renderPost(post) {
  const list = el("ul");
  for (const comment of post.comments) {
    list.append(el("li", { class: `status-${comment.status}`, "data-status": comment.status }, commentText(comment)));
  }
  const input = el("input", { id: `comment-${post.id}`, name: "content", autocomplete: "off" });
  const error = el("p", { class: "error", role: "alert" });
  const form = el("form", { novalidate: "" },
    el("label", { for: `comment-${post.id}` }, "Comment"), input, el("button", { type: "submit" }, "Add comment"), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await api(`/posts/${encodeURIComponent(post.id)}/comments`, { content: input.value });
      input.value = "";
      await refresh();
    } catch (e) {
      error.textContent = e.message;
    }
  });
  return el("article", { class: "post", "data-post-id": post.id }, el("h3", {}, post.title), list, form);
}

async function refresh() {
  try {
    const posts = Object.values(await api("/posts"));
    postsEl.replaceChildren(...posts.map(renderPost));
    stateEl.textContent = posts.length === 0 ? "No posts yet." : "";
  } catch (e) {
    stateEl.textContent = `Could not load posts: ${e.message}`;
  }
}

document.getElementById("create-post").addEventListener("submit", async (event) => {
  event.preventDefault();
  const title = document.getElementById("post-title");
  const error = document.getElementById("post-error");
  error.textContent = "";
  try {
    await api("/posts/create", { title: title.value });
    title.value = "";
    await refresh();
  } catch (e) {
    error.textContent = e.message;
  }
});

refresh();
setInterval(refresh, 2000);
