// The console's little script. Pages work without it (forms post and come back); with it:
// - [data-live]: the alert list receives new alerts as server-sent events and puts them on top;
// - [data-refresh=N]: the element is fetched again every N seconds (same page, same id) and swapped in;
// - img[data-refresh-src=N]: the image is reloaded every N seconds (a camera's latest frame);
// - form[data-confirm]: asks before posting (roll back, remove a user).
"use strict";

function liveAlerts(list) {
  const empty = document.getElementById("alerts-empty");
  const state = document.getElementById("live-state");
  const max = parseInt(list.dataset.max || "50", 10);
  const want = { app: list.dataset.filterApp, source: list.dataset.filterSource, label: list.dataset.filterLabel };
  const source = new EventSource(list.dataset.live);
  source.onopen = () => { if (state) { state.textContent = state.dataset.connected; state.dataset.state = "open"; } };
  source.onerror = () => { if (state) { state.textContent = state.dataset.lost; state.dataset.state = "lost"; } };
  source.addEventListener("alert", (e) => {
    const alert = JSON.parse(e.data);
    for (const key of ["app", "source", "label"]) {
      if (want[key] && want[key] !== alert[key]) return;
    }
    if (document.getElementById("alert-" + alert.id)) return;
    const holder = document.createElement("ul");
    holder.innerHTML = alert.html;
    const row = holder.firstElementChild;
    if (!row) return;
    const next = row.querySelector("input[name=next]");
    if (next) next.value = location.pathname + location.search;
    row.classList.add("arrived");
    list.prepend(row);
    while (list.children.length > max) list.lastElementChild.remove();
    if (empty) empty.hidden = true;
  });
}

function refreshAll(elements) {
  // one request for all of them: the page itself, whose elements with the same ids replace the shown ones
  const seconds = Math.min(...elements.map((el) => parseInt(el.dataset.refresh, 10)));
  const ids = elements.map((el) => el.id);
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (response.redirected || !response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const id of ids) {
        const shown = document.getElementById(id), fresh = page.getElementById(id);
        if (shown && fresh) shown.replaceWith(fresh);
      }
    } catch (e) { /* offline for a moment: try again next time */ }
  }, seconds * 1000);
}

function refreshImage(img) {
  const seconds = parseInt(img.dataset.refreshSrc, 10);
  const base = img.src.split("?")[0];
  setInterval(() => { if (!document.hidden) img.src = base + "?t=" + Date.now(); }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(liveAlerts);
  const refreshing = [...document.querySelectorAll("[data-refresh][id]")];
  if (refreshing.length) refreshAll(refreshing);
  document.querySelectorAll("img[data-refresh-src]").forEach(refreshImage);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
  });
});
