% rebase('layout', title=title)
<h1>Not allowed</h1>
<p class="error">This page needs level <strong>{{level}}</strong>; you are logged in as
{{me.name}} with level {{me.level}}.</p>
