% rebase('layout', title=site_name)
<h1>{{site_name}}</h1>
<p>Librarian server version {{version}}. The JSON API lives under <code>/api/</code>.</p>
