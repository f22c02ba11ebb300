// Tell a station doctor that a specialist answered, wherever they are in the app:
// a visible notice (with a link to the study), a marked page title, and, only if they
// turned it on with the topbar toggle, a short beep made with WebAudio (no sound file).
// The server marks such changes with `answer: true` (routes/live.py); the worklist and
// study scripts re-fetch their own content on the same event.
(function () {
  "use strict";
  if (document.body.dataset.role !== "station") return;
  var notice = document.getElementById("reply-notice");
  var toggle = document.getElementById("sound-toggle");
  var KEY = "xrt.sound";
  var originalTitle = document.title;
  var unseen = 0;

  function soundOn() {
    try { return window.localStorage.getItem(KEY) === "on"; } catch (e) { return false; }
  }

  function showToggle() {
    if (!toggle) return;
    var on = soundOn();
    toggle.setAttribute("aria-pressed", on ? "true" : "false");
    toggle.textContent = on ? toggle.dataset.labelOn : toggle.dataset.labelOff;
  }

  var audio = null;
  function beep() {
    var Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return;
    try {
      audio = audio || new Context();
      if (audio.state === "suspended") audio.resume();
      var now = audio.currentTime;
      [0, 0.25].forEach(function (offset) { // two short tones, 880 Hz
        var osc = audio.createOscillator();
        var gain = audio.createGain();
        osc.type = "sine";
        osc.frequency.value = 880;
        gain.gain.setValueAtTime(0.0001, now + offset);
        gain.gain.exponentialRampToValueAtTime(0.2, now + offset + 0.02);
        gain.gain.exponentialRampToValueAtTime(0.0001, now + offset + 0.18);
        osc.connect(gain).connect(audio.destination);
        osc.start(now + offset);
        osc.stop(now + offset + 0.2);
      });
      window.xrt.lastBeep = Date.now(); // lets a test see that the beep was played
    } catch (e) { /* no audio: the notice and the title still tell */ }
  }

  if (toggle) {
    showToggle();
    window.addEventListener("storage", showToggle); // turned on or off in another tab
    toggle.addEventListener("click", function () {
      try { window.localStorage.setItem(KEY, soundOn() ? "off" : "on"); } catch (e) { return; }
      showToggle();
      if (soundOn()) beep(); // a user gesture: unlocks audio and lets them hear it
    });
  }

  function dismiss() {
    unseen = 0;
    document.title = originalTitle;
    if (notice) notice.hidden = true;
  }

  window.addEventListener("xrt:changed", function (event) {
    var detail = event.detail || {};
    if (!detail.answer || !notice) return;
    unseen += 1;
    var text = notice.querySelector(".reply-notice-text");
    var row = document.querySelector('tr[data-study-uid="' + detail.study_uid + '"] a.patient');
    var head = document.getElementById("study");
    var name = row ? row.textContent
      : (head && head.dataset.studyUid === detail.study_uid && document.getElementById("patient-name"))
        ? document.getElementById("patient-name").textContent : "";
    text.textContent = text.dataset.text + (name ? " · " + name : "");
    document.getElementById("reply-notice-open").href = "/studies/" + encodeURIComponent(detail.study_uid);
    notice.hidden = false;
    document.title = "(" + unseen + ") " + notice.dataset.title + " · " + originalTitle;
    if (soundOn()) beep();
  });

  var close = document.getElementById("reply-notice-dismiss");
  if (close) close.addEventListener("click", dismiss);
})();
