% rebase('layout', title=title)
<h1>{{title}}</h1>
<p class="error">{{message}}</p>
