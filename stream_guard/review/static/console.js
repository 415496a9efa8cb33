// stream-guard review console. Every string from the server is written with textContent, never
// as HTML: captions and rationales are untrusted. Decisions go to the service (JSON + the
// X-Review-Console header), which publishes them; images come from the service, never from S3.
"use strict";

const state = { items: [], selected: null, detail: null, chosen: new Set(), revealed: false,
                busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function say(message, error = false) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// -- the queue -------------------------------------------------------------------------------

async function refreshQueue() {
  let queue;
  try {
    queue = await api("/api/queue");
  } catch (e) {
    $("count").textContent = `queue unavailable: ${e.message}`;
    return;
  }
  state.items = queue.items;
  $("count").textContent = `${queue.pending} waiting` + (queue.caught_up ? "" : " (still reading)")
    + ` · ${queue.settled} decided here`;
  renderQueue();
  const ids = state.items.map((i) => i.upload_id);
  if (state.selected === null || !ids.includes(state.selected)) {
    select(ids.length ? ids[0] : null);
  }
}

function renderQueue() {
  const list = $("items");
  list.replaceChildren();
  for (const item of state.items) {
    const li = el("li");
    li.dataset.uploadId = item.upload_id;
    if (item.upload_id === state.selected) li.classList.add("selected");
    li.append(el("span", item.upload_id, "id"));
    const top = item.top ? `${item.top.name} ${item.top.score.toFixed(2)}` : "no scores";
    li.append(el("span", `${item.tenant_id} · ${top} · ${item.images} image(s)`, "top"));
    li.append(el("span", item.preview, "preview"));
    li.addEventListener("click", () => select(item.upload_id));
    list.append(li);
  }
}

// -- one item --------------------------------------------------------------------------------

async function select(uploadId) {
  state.selected = uploadId;
  state.chosen = new Set();
  state.revealed = false;
  renderQueue();
  if (uploadId === null) {
    state.detail = null;
    $("detail").hidden = true;
    $("empty").hidden = false;
    return;
  }
  try {
    const detail = await api(`/api/items/${encodeURIComponent(uploadId)}`);
    if (state.selected !== uploadId) return;
    state.detail = detail;
    renderDetail();
  } catch (e) {
    say(`cannot open ${uploadId}: ${e.message}`, true);
  }
}

function renderDetail() {
  const d = state.detail;
  $("empty").hidden = true;
  $("detail").hidden = false;
  $("title").textContent = d.upload_id;
  $("meta").textContent = `tenant ${d.tenant_id} · policy ${d.policy_id} ${d.policy_version}`
    + ` · ${d.model_version}`;
  $("reason").textContent = d.review_reason || "needs a person";
  $("missing").hidden = !d.details_missing;
  renderImages(d.images);
  renderText(d.text);
  renderScores();
  const r = d.reasoning;
  $("reasoning").textContent = r
    ? `${r.model} said ${r.decision}` + (r.categories.length ? ` (${r.categories.join(", ")})` : "")
    : "no reasoning-model answer";
  $("rationale").textContent = d.rationale || "(no rationale)";
  renderPolicy(d.policy, d.policy_version);
  $("note").value = "";
}

function renderImages(urls) {
  const box = $("images");
  box.replaceChildren();
  reveal(state.revealed);
  for (const url of urls) {
    const img = el("img");
    img.alt = "uploaded image";
    img.src = url;
    img.addEventListener("error", () => img.replaceWith(el("span", "image unavailable",
                                                           "image-error")));
    box.append(img);
  }
  $("images-hint").hidden = urls.length === 0;
}

function reveal(shown) {
  state.revealed = shown;
  $("images").classList.toggle("blurred", !shown);
  $("images-hint").textContent = shown ? "Images shown: press v to blur them."
                                       : "Images are blurred: press v to show them.";
}

function renderText(text) {
  const dl = $("text");
  dl.replaceChildren();
  for (const field of ["title", "caption", "prompt", "response"]) {
    if (!text[field]) continue;
    dl.append(el("dt", field), el("dd", text[field]));
  }
}

function ordered() {
  return [...state.detail.categories].sort((a, b) => b.score - a.score);
}

function renderScores() {
  const body = $("scores").querySelector("tbody");
  body.replaceChildren();
  ordered().forEach((c, n) => {
    const tr = el("tr");
    tr.dataset.code = c.code;
    if (c.flagged) tr.classList.add("flagged");
    if (state.chosen.has(c.code)) tr.classList.add("chosen");
    const box = el("input");
    box.type = "checkbox";
    box.checked = state.chosen.has(c.code);
    box.setAttribute("aria-label", `block for ${c.name}`);
    box.addEventListener("change", () => toggle(c.code));
    const bar = el("span", null, "bar");
    bar.style.width = `${Math.round(c.score * 120)}px`;
    const score = el("td");
    score.append(bar, el("span", c.score.toFixed(3)));
    const cells = [el("td", n < 9 ? String(n + 1) : ""), el("td"), el("td", `${c.code} ${c.name}`),
                   score, el("td", c.fast_decision)];
    cells[1].append(box);
    tr.append(...cells);
    body.append(tr);
  });
}

function renderPolicy(policy, version) {
  const box = $("policy");
  box.replaceChildren();
  $("policy-version").textContent = policy.version === null
    ? "this console does not read that policy"
    : policy.same_version ? `version ${policy.version}`
    : `shown: the current version ${policy.version} (the upload was judged under ${version})`;
  for (const c of policy.categories) {
    const div = el("div", null, "category");
    div.append(el("strong", `${c.code} ${c.name}`), el("p", c.definition));
    box.append(div);
  }
}

function toggle(code) {
  if (state.chosen.has(code)) state.chosen.delete(code);
  else state.chosen.add(code);
  renderScores();
}

// -- deciding --------------------------------------------------------------------------------

async function decide(decision) {
  const d = state.detail;
  if (!d || state.busy) return;
  const categories = decision === "block" ? [...state.chosen] : [];
  if (decision === "block" && categories.length === 0) {
    say("choose at least one category to block (keys 1-9)", true);
    return;
  }
  const reviewer = $("reviewer").value.trim();
  state.busy = true;
  try {
    await api(`/api/items/${encodeURIComponent(d.upload_id)}/decision`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Review-Console": "1" },
      body: JSON.stringify({ decision, categories, note: $("note").value, reviewer }),
    });
    say(`${decision === "allow" ? "allowed" : "blocked"} ${d.upload_id}`
        + (categories.length ? ` (${categories.join(", ")})` : ""));
    const index = state.items.findIndex((i) => i.upload_id === d.upload_id);
    state.items.splice(index, 1);
    select(state.items.length ? state.items[Math.min(index, state.items.length - 1)].upload_id
                              : null);
  } catch (e) {
    say(`not decided: ${e.message}`, true);
  } finally {
    state.busy = false;
  }
}

function move(step) {
  const ids = state.items.map((i) => i.upload_id);
  if (!ids.length) return;
  const at = Math.max(0, ids.indexOf(state.selected));
  select(ids[Math.min(ids.length - 1, Math.max(0, at + step))]);
}

function onKey(event) {
  const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (typing) {
    if (event.key === "Escape") document.activeElement.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "j" || key === "ArrowDown") move(1);
  else if (key === "k" || key === "ArrowUp") move(-1);
  else if (key === "a") decide("allow");
  else if (key === "b") decide("block");
  else if (key === "v") reveal(!state.revealed);
  else if (key === "n") {
    $("note").focus();
  } else if (key === "?") {
    $("help").hidden = !$("help").hidden;
  } else if (/^[1-9]$/.test(key) && state.detail) {
    const c = ordered()[Number(key) - 1];
    if (c) toggle(c.code);
  } else {
    return;
  }
  event.preventDefault();
}

function start() {
  $("reviewer").value = localStorage.getItem("reviewer") || "";
  $("reviewer").addEventListener("change", () => {
    localStorage.setItem("reviewer", $("reviewer").value.trim());
  });
  $("allow").addEventListener("click", () => decide("allow"));
  $("block").addEventListener("click", () => decide("block"));
  $("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  document.addEventListener("keydown", onKey);
  refreshQueue();
  setInterval(refreshQueue, 1500);
}

document.addEventListener("DOMContentLoaded", start);
