% rebase('layout', title=title)
<h1>Stores</h1>
% include('store_table', stores=stores)
