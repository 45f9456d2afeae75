% rebase('layout', title=title)
<h1>Files found</h1>
<p><span id="count">{{count}}</span> file(s), <span title="{{total_size}} bytes">{{human_size(total_size)}}</span> in all.
<a href="/search-files">New search</a></p>
<pre class="mono">{{text}}</pre>
% include('file_table', files=files)
% include('pager')
% if staging and me.allows('read-write') and count:
<h2>Stage these files</h2>
<form method="post" action="/stage">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <input type="hidden" name="search" value="{{text}}">
  <p><label>Folder in your staging area <input name="dest" placeholder="e.g. night-2458043"></label>
  <button type="submit">Stage</button></p>
</form>
% end
