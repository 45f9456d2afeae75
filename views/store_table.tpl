<table>
<tr><th>Store</th><th>Host</th><th>Path</th><th>Available</th><th class="num">Capacity</th>
<th class="num">Used</th><th class="num">Free</th><th>Usage</th></tr>
% for s, (total, used, free) in stores:
<tr><td><a href="/stores/{{quote(s.name)}}">{{s.name}}</a></td><td>{{s.ssh_host}}</td>
<td class="mono">{{s.path_prefix}}</td><td>{{'yes' if s.available else 'no'}}</td>
<td class="num" title="{{total}} bytes">{{human_size(total)}}</td>
<td class="num" title="{{used}} bytes">{{human_size(used)}}</td>
<td class="num" title="{{free}} bytes">{{human_size(free)}}</td>
<td>
% fill = fill_percent(total, used, free)
% if fill is not None:
<span class="bar" title="{{'%.1f' % fill}}% used"><span style="width: {{'%.1f' % fill}}%"></span></span>
% else:
unreachable
% end
</td></tr>
% end
</table>
