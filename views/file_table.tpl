% if not files:
<p class="note">No files.</p>
% else:
<table>
<tr><th>Name</th><th class="num">Size</th><th>Obsid</th><th>Type</th><th>Registered (UTC)</th></tr>
% for f in files:
<tr><td class="mono"><a href="/files/{{quote(f.name)}}">{{f.name}}</a></td>
<td class="num" title="{{f.size}} bytes">{{human_size(f.size)}}</td>
<td>
% if f.obsid is not None:
<a href="/observations/{{f.obsid}}">{{f.obsid}}</a>
% else:
-
% end
</td><td>{{f.type}}</td><td>{{fmt_time(f.create_time)}}</td></tr>
% end
</table>
% end
