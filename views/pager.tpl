<p class="pager">
% if page > 1:
<a href="?{{!query_for(page - 1)}}">&larr; previous</a>
% end
% if more:
<a href="?{{!query_for(page + 1)}}">next &rarr;</a>
% end
<span class="note">page {{page}}</span>
</p>
