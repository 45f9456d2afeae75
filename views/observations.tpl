% rebase('layout', title=title)
<h1>Observations</h1>
<p><a href="/search-obs">Search observations</a></p>
% include('obs_table', observations=observations)
% include('pager')
