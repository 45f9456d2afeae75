% rebase('layout', title=title)
<h1>Upload a file</h1>
<p class="note">For a directory (a MIRIAD data set), use <code>librarian upload</code>, which
sends it as a tar stream.</p>
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
<noscript><p class="error">The upload form needs JavaScript, to stream the file and show its
progress. Without it, use the <code>librarian upload</code> command.</p></noscript>
<script>
document.getElementById("upload-form").addEventListener("submit", function (event) {
  event.preventDefault();
  var file = document.getElementById("file").files[0];
  if (!file) { return; }
  var prefix = document.getElementById("prefix").value.replace(/^\/+|\/+$/g, "");
  var path = (prefix ? prefix.split("/").map(encodeURIComponent).join("/") + "/" : "")
             + encodeURIComponent(file.name);
  var query = "?deletion_policy=" + document.getElementById("deletion").value
              + (document.getElementById("null-obsid").checked ? "&null_obsid=true" : "");
  var xhr = new XMLHttpRequest();
  var progress = document.getElementById("progress"), status = document.getElementById("status");
  progress.hidden = false;
  xhr.upload.onprogress = function (e) {
    if (e.lengthComputable) { progress.value = 100 * e.loaded / e.total;
      status.textContent = Math.round(100 * e.loaded / e.total) + "% sent"; }
  };
  xhr.onload = function () {
    var reply = {};
    try { reply = JSON.parse(xhr.responseText); } catch (e) {}
    if (xhr.status === 201) {
      window.location = "/files/" + encodeURIComponent(reply.name);
    } else if (xhr.status === 200) {
      status.innerHTML = "";
      status.appendChild(document.createTextNode("This file is already in the archive, at "
        + reply.store_path + " on store " + reply.store_name + "; nothing was changed. "));
      var link = document.createElement("a");
      link.href = "/files/" + encodeURIComponent(reply.name);
      link.textContent = "Its page";
      status.appendChild(link);
    } else {
      status.textContent = "Refused: " + (reply.message || xhr.statusText);
      status.className = "error";
    }
  };
  xhr.onerror = function () { status.textContent = "The connection failed."; status.className = "error"; };
  xhr.open("PUT", "/api/upload/" + path + query);
  xhr.setRequestHeader("X-CSRF-Token", "{{csrf}}");
  xhr.send(file);
});
</script>
