// Study page: re-fetch the consult panel when this study changes (reply, claim,
// conclusion), and say so when a new AI result arrives.
(function () {
  "use strict";
  var head = document.getElementById("study");
  var panel = document.getElementById("consult-panel");
  if (!head || !panel) return;
  var uid = head.dataset.studyUid;
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
