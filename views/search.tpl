% rebase('layout', title=title)
<h1>{{title}}</h1>
<form method="post" action="/search">
  <input type="hidden" name="type" value="{{kind}}">
  <p><textarea name="search" rows="6" cols="80">{{text}}</textarea></p>
% if error:
  <p class="error" id="search-error">{{error}}</p>
% end
  <p><label>Output <select name="output_format">
% for f in formats:
    <option>{{f}}</option>
% end
  </select></label>
  <button type="submit">Search</button></p>
</form>
<p class="note">A search is a JSON object of clauses that must all hold. Text after <code>#</code>
on a line (outside a quoted string) is a comment. <code>matches</code> is SQL LIKE:
<code>%</code> any run of characters, <code>_</code> one character. Ranges are
<code>[low, high]</code>, ends included. A record without an attribute matches none of its
clauses.
% if kind == 'files':
The raw-text outputs give at most 100,000 lines; for more, use the API or
<code>librarian search-files</code> with <code>--limit</code> and <code>--offset</code>.
% end
</p>
% attrs, others = clauses
<table class="note">
<tr><th>Attribute</th><th>Type</th><th>Clauses</th></tr>
% for name, typ, names in attrs:
<tr><td><code>{{name}}</code></td><td>{{typ}}</td><td><code>{{', '.join(names)}}</code></td></tr>
% end
<tr><td colspan="2">other clauses</td><td><code>{{', '.join(others)}}</code></td></tr>
</table>
