% rebase('layout', title=title)
<h1>Upload a file</h1>
<p class="note">A folder (a MIRIAD data set) is sent with <code>librarian upload</code>, as a
tar. A file is sent here in parts of at most {{chunk_mib}}; if the connection drops, the upload goes on
from where it stopped, also after reloading this page and choosing the same file.</p>
<form id="upload-form">
  <p><label>File <input type="file" id="file" required></label></p>
  <p><label>Folders on the store <input type="text" id="prefix" placeholder="e.g. 2458432" size="30"></label>
  <span class="note">the file keeps its own name, which must be new to the archive</span></p>
  <p><label><input type="checkbox" id="null-obsid"> The file has no observation (null obsid)</label></p>
  <p><label>Deletion policy <select id="deletion">
    <option value="disallowed">disallowed</option><option value="allowed">allowed</option></select></label></p>
  <p><button type="submit" id="send">Upload</button></p>
</form>
<p><progress id="progress" value="0" max="100" hidden></progress> <span id="status" class="note"></span></p>
<noscript><p class="error">The upload form needs JavaScript, to send the file in parts and show
its progress. Without it, use the <code>librarian upload</code> command.</p></noscript>
<script src="/static/tus.min.js"></script>
<script>
(function () {
  var progress = document.getElementById("progress"), status = document.getElementById("status");
  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "note";
    if (isError) { progress.hidden = true; }
  }
  function webWords(message) {
    // The server's refusals name the API's flag; here it is the checkbox.
    return message.split("({{say_null_obsid}})").join('(tick "The file has no observation")');
  }
  function messageOf(body, fallback) {
    try { return webWords(JSON.parse(body).message || fallback); } catch (e) { return fallback; }
  }
  function finished(uploadUrl) {
    // The last part registered the file; its outcome says where it is.
    fetch(uploadUrl, {credentials: "same-origin"}).then(function (r) { return r.json(); })
      .then(function (state) {
        var outcome = state.outcome || {};
        if (outcome.success && outcome.status === 201) {
          window.location = "/files/" + encodeURIComponent(outcome.name);
        } else if (outcome.success) {
          say("This file is already in the archive, at " + outcome.store_path + " on store "
              + outcome.store_name + "; nothing was changed. ", false);
          var link = document.createElement("a");
          link.href = "/files/" + encodeURIComponent(outcome.name);
          link.textContent = "Its page";
          status.appendChild(link);
        } else {
          say("Not stored: " + webWords(outcome.message || "the upload did not finish"), true);
        }
      }, function () { say("The server could not be asked how the upload ended.", true); });
  }
  document.getElementById("upload-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var file = document.getElementById("file").files[0];
    if (!file) { return; }
    var prefix = document.getElementById("prefix").value.replace(/^\/+|\/+$/g, "");
    var upload = new tus.Upload(file, {
      endpoint: "/api/uploads",
      chunkSize: {{chunk}},
      retryDelays: [0, 1000, 3000, 5000, 10000, 20000],
      headers: {"X-CSRF-Token": "{{csrf}}"},
      metadata: {dest: (prefix ? prefix + "/" : "") + file.name, filename: file.name,
                 deletion_policy: document.getElementById("deletion").value,
                 null_obsid: document.getElementById("null-obsid").checked ? "true" : "false"},
      // No resuming from an earlier page: the form sends no MD5 (browsers
      // have none), so a file changed since then would be stored as a mix
      // of old and new bytes. Within the page, a dropped connection resumes.
      storeFingerprintForResuming: false,
      onProgress: function (sent, total) {
        progress.hidden = false;
        progress.value = total ? 100 * sent / total : 100;
        say(Math.round(total ? 100 * sent / total : 100) + "% sent", false);
      },
      onError: function (error) {
        var response = error.originalResponse;
        say("Not stored: " + (response ? messageOf(response.getBody(), "the server refused it")
                              : "the connection failed; send the file again"), true);
      },
      onSuccess: function () { say("Checking the file...", false); finished(upload.url); }
    });
    upload.start();
  });
})();
</script>
