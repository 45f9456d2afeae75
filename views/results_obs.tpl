% rebase('layout', title=title)
<h1>Observations found</h1>
<p><span id="count">{{count}}</span> observation(s). <a href="/search-obs">New search</a></p>
<pre class="mono">{{text}}</pre>
% include('obs_table', observations=observations)
% include('pager')
