% rebase('layout', title=title)
<h1>Sessions found</h1>
<p><span id="count">{{count}}</span> session(s). <a href="/search-sessions">New search</a></p>
<pre class="mono">{{text}}</pre>
% include('session_table', sessions=sessions, counts=True)
% include('pager')
