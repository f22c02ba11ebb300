// Live updates for every page: one EventSource on /events. Each change is
// re-dispatched on window as CustomEvent('xrt:changed', {detail: {kind, study_uid}})
// so the page's own script (worklist.js, study.js, viewer.js) decides what to re-fetch.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  function setState(state) {
    document.body.dataset.live = state; // "live" once the stream is open (tests wait for it)
    if (!status) return;
    status.dataset.state = state;
    var text = status.dataset["label" + state.charAt(0).toUpperCase() + state.slice(1)];
    if (text) status.textContent = text;
  }
  if (!document.querySelector("meta[name=csrf-token]") || !document.querySelector("meta[name=csrf-token]").content) {
    return; // not logged in: no stream
  }
  if (!window.EventSource) return;
  var source = new EventSource("/events");
  source.addEventListener("open", function () { setState("live"); });
  source.addEventListener("error", function () { setState("offline"); });
  source.addEventListener("change", function (event) {
    var detail;
    try { detail = JSON.parse(event.data); } catch (e) { return; }
    window.dispatchEvent(new CustomEvent("xrt:changed", { detail: detail }));
  });
})();

// Shared helpers for page scripts.
window.xrt = {
  csrf: function () {
    var meta = document.querySelector("meta[name=csrf-token]");
    return meta ? meta.content : "";
  },
  // Replace an element's content with server-rendered HTML from its data-src,
  // keeping what the user was typing in text fields (matched by id).
  refresh: function (element) {
    if (!element || !element.dataset.src) return Promise.resolve();
    // Refreshes can overlap (a change arrives while the last one is in flight): only the newest
    // one's answer is shown, so a slow older answer never puts stale rows back.
    var seq = (element.xrtRefreshSeq = (element.xrtRefreshSeq || 0) + 1);
    return fetch(element.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (seq !== element.xrtRefreshSeq) return;  // a newer refresh was started: its answer wins
        var kept = {};
        var focused = document.activeElement && document.activeElement.id;
        element.querySelectorAll("textarea[id], input[type=text][id]").forEach(function (field) {
          if (field.value) kept[field.id] = field.value;
        });
        element.innerHTML = html;
        Object.keys(kept).forEach(function (id) {
          var field = document.getElementById(id);
          if (field) field.value = kept[id];
        });
        if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
      })
      .catch(function () { /* keep what is shown; the next change retries */ });
  }
};
