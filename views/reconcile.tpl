% rebase('layout', title=title)
<h1>Reconciliation of store <a href="/stores/{{quote(store.name)}}">{{store.name}}</a></h1>
<p class="note">The store's bytes compared with the catalogue every {{'%g' % interval}} h; nothing
is changed. <code>python librarian.py reconcile {{store.name}}</code> lists everything and
offers the fixes.</p>
% if state:
<p id="state">A reconciliation is {{state}}.</p>
% end
% if me.level == 'admin':
<form method="post" action="/stores/{{quote(store.name)}}/reconcile">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <button type="submit" id="run">Reconcile now</button>
</form>
% end
% if report is None:
<p id="none" class="note">No reconciliation has finished yet.</p>
% else:
<p id="finished">Last finished {{fmt_time(report['finished'])}} UTC, in {{'%.1f' % report['seconds']}} s:
{{', '.join('%d %s' % (report['counts'][k], k.replace('_', ' ')) for k in kinds)}}.</p>
% sections = [('lost', 'Lost: records whose bytes are not on the store', ('store_path', 'file_name')),
%             ('dark', 'Dark: what no record names', ('store_path', 'type')),
%             ('size_mismatch', 'Size mismatch: bytes other than recorded',
%              ('store_path', 'file_name', 'recorded_size', 'found_size'))]
% for kind, heading, columns in sections:
%   rows, n = report[kind], report['counts'][kind]
<h2>{{heading}} ({{n}})</h2>
%   if rows:
<table id="{{kind}}">
<tr>{{!''.join('<th>%s</th>' % c.replace('_', ' ') for c in columns)}}</tr>
%     for e in rows:
<tr>
%       for c in columns:
%         if c == 'file_name':
<td><a href="/files/{{quote(e[c])}}">{{e[c]}}</a></td>
%         else:
<td class="{{'mono' if c == 'store_path' else 'num' if c.endswith('size') else ''}}">{{e[c]}}</td>
%         end
%       end
</tr>
%     end
</table>
%   end
%   if n > len(rows):
<p class="note">… and {{n - len(rows)}} more, not kept for this page (the command line lists them all).</p>
%   end
% end
% end
