% rebase('layout', title=title)
<h1>Files found</h1>
<p><span id="count">{{count}}</span> file(s), <span title="{{total_size}} bytes">{{human_size(total_size)}}</span> in all.
<a href="/search-files">New search</a></p>
<pre class="mono">{{text}}</pre>
% include('file_table', files=files)
% include('pager')
