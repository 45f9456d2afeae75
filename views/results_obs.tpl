% rebase('layout', title=title)
<h1>Observations found</h1>
<p><a href="/search-obs">New search</a></p>
<pre class="mono">{{text}}</pre>
% include('obs_table', observations=observations)
% include('pager')
