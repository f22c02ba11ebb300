// Study page: consult actions are sent in the background so the viewer keeps its
// zoom, window and drawing state (the forms still work without JavaScript: they
// post and come back to this page). The consult panel is re-fetched when this
// study changes (reply, claim, conclusion), and a notice says when new AI results arrive.
(function () {
  "use strict";
  var head = document.getElementById("study");
  var panel = document.getElementById("consult-panel");
  if (!head || !panel) return;
  var uid = head.dataset.studyUid;

  function showError(text) {
    var box = document.getElementById("consult-error");
    if (!box) {
      box = document.createElement("p");
      box.id = "consult-error";
      box.className = "error";
      box.setAttribute("role", "alert");
      panel.parentNode.insertBefore(box, panel);
    }
    box.textContent = text;
    box.hidden = !text;
  }

  panel.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    event.preventDefault();
    if (form.dataset.confirm !== undefined) {
      // Closing asks first; an unanswered question from the other side is named in the question.
      if (!window.confirm(form.dataset.confirm)) return;
      var ack = form.querySelector("input[name=acknowledge_unanswered]");
      if (ack && form.dataset.unanswered === "1") ack.value = "1";
    }
    var buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    fetch(form.action, {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      credentials: "same-origin",
      redirect: "manual"
    }).then(function (response) {
      if (response.type === "opaqueredirect" || response.ok) {
        showError("");
        form.querySelectorAll("textarea, input[type=text]").forEach(function (f) { f.value = ""; });
        return window.xrt.refresh(panel);
      }
      return response.text().then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var title = doc.querySelector("h1");
        var detail = doc.querySelector("#error-detail");
        showError((title ? title.textContent : "HTTP " + response.status) + (detail ? " — " + detail.textContent : ""));
      });
    }).catch(function () {
      showError(panel.dataset.offline || "offline");
    }).then(function () {
      buttons.forEach(function (b) { b.disabled = false; });
    });
  });

  window.addEventListener("xrt:changed", function (event) {
    if (!event.detail || event.detail.study_uid !== uid) return;
    if (String(event.detail.kind).indexOf("consult.") === 0 || event.detail.kind === "study") {
      window.xrt.refresh(panel);
    }
    if (event.detail.kind === "study") {
      var note = document.getElementById("study-updated");
      if (note) note.hidden = false;
    }
  });
})();
