% rebase('layout', title=title)
<h1>Connectivity</h1>
<h2>Other Librarians</h2>
% if not connections:
<p class="note">No connections are configured.</p>
% else:
<table>
<tr><th>Connection</th><th>URL</th><th>Answers</th><th>Its stores</th></tr>
% for c in connections:
<tr><td>{{c['name']}}</td><td class="mono">{{c['url'] or '-'}}</td>
<td>{{'yes' if c['ok'] else ''}}<span class="error">{{'' if c['ok'] else 'no: ' + c['message']}}</span></td>
<td>{{', '.join('%s (%s)' % (s['name'], s['ssh_host']) for s in c['stores'])}}</td></tr>
% end
</table>
% end
<h2>Stores here</h2>
<table>
<tr><th>Store</th><th>Host</th><th>Path</th><th>Reachable</th><th class="num">Free</th></tr>
% for s, problem, (total, used, free) in stores:
<tr><td><a href="/stores/{{quote(s.name)}}">{{s.name}}</a></td><td>{{s.ssh_host}}</td><td class="mono">{{s.path_prefix}}</td>
<td>{{'yes' if problem is None else ''}}<span class="error">{{'' if problem is None else 'no: ' + problem}}</span></td><td class="num" title="{{free}} bytes">{{human_size(free)}}</td></tr>
% end
</table>
