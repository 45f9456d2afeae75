% rebase('layout', title=title)
<h1>Health</h1>
<table id="summary">
<tr><th>Files</th><td class="num">{{s['files'][0]}}</td><td title="{{s['files'][1]}} bytes">{{human_size(s['files'][1])}}</td></tr>
<tr><th>Files short of copies</th><td class="num" id="short">{{s['short']}}</td>
<td class="note">at most {{s['min_other_copies']}} good {{'copy' if s['min_other_copies'] == 1 else 'copies'}} here and at other Librarians: none of their copies may be deleted</td></tr>
<tr><th>Failed tasks</th><td class="num" id="failed">{{failed}}</td><td><a href="/tasks">tasks</a></td></tr>
% for name, n in s['remote'].items():
<tr><th>Copies held by {{name}}</th><td class="num">{{n}}</td><td></td></tr>
% end
</table>
<h2>Stores</h2>
<table id="stores">
<tr><th>Store</th><th class="num">Instances</th><th class="num">Their bytes</th><th class="num">Capacity</th>
<th class="num">Free</th><th>Fill</th><th class="num">Verified in period</th><th class="num">Overdue</th>
<th class="num">Corrupt</th><th class="num">Missing</th></tr>
% for row, n, usage in s['stores']:
%   f = fill(usage)
<tr><td><a href="/stores/{{quote(row.name)}}">{{row.name}}</a></td>
<td class="num">{{n['instances']}}</td><td class="num" title="{{n['bytes']}} bytes">{{human_size(n['bytes'])}}</td>
% if f is None:
<td class="num">-</td><td class="num">-</td><td><span class="error">unreachable</span></td>
% else:
<td class="num" title="{{usage.total}} bytes">{{human_size(usage.total)}}</td>
<td class="num" title="{{usage.free}} bytes">{{human_size(usage.free)}}</td>
<td><span class="bar" title="{{'%.1f' % (100 * f)}}% full"><span style="width: {{'%.1f' % (100 * f)}}%"></span></span> {{'%.1f' % (100 * f)}}%</td>
% end
<td class="num">{{n['verified']}}{{' (%.0f%%)' % (100.0 * n['verified'] / n['instances']) if n['instances'] else ''}}</td>
<td class="num">{{n['overdue']}}</td><td class="num">{{n['corrupt']}}</td><td class="num">{{n['missing']}}</td></tr>
% end
</table>
<h2>Corrupt and missing instances</h2>
% if not bad:
<p class="note">None found.</p>
% else:
<table id="bad">
<tr><th>File</th><th>Store</th><th>Folder</th><th>Found</th><th>When (UTC)</th></tr>
% for name, store, parent_dirs, result, when in bad:
<tr><td class="mono"><a href="/files/{{quote(name)}}">{{name}}</a></td><td>{{store}}</td>
<td class="mono">{{parent_dirs}}</td><td class="error">{{result}}</td><td>{{fmt_time(when)}}</td></tr>
% end
</table>
%   if len(bad) == max_listed:
<p class="note">The latest {{max_listed}} are listed; the counts above are complete.</p>
%   end
% end
