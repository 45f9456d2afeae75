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
<p class="note">The search language is a JSON object of clauses; see SEARCH.md. Text after
<code>#</code> on a line (outside a quoted string) is a comment. The raw-text outputs give at
most 100,000 lines; use the API or <code>librarian search-files</code> with <code>--limit</code>
and an offset for more.</p>
