% rebase('layout', title=title)
<h1>Tasks</h1>
% def task_rows(rows, extra):
% if not rows:
<p class="note">None.</p>
% else:
<table>
<tr><th>Task</th><th>Kind</th><th>File</th><th>Attempts</th><th>{{extra}}</th><th></th></tr>
% for t in rows:
<tr><td>{{t.id}}</td><td>{{t.kind}}</td><td class="mono">{{t.file_name or ''}}</td><td>{{t.attempts}}/{{t.max_attempts}}</td>
<td>
%   if t.state == 'pending':
due {{fmt_time(t.next_attempt)}} UTC{{'; last error: ' + t.last_error if t.last_error else ''}}
%   elif t.state == 'running':
<span title="{{t.progress_bytes}} bytes">{{human_size(t.progress_bytes)}}</span> at {{human_size(rates.get(t.id, 0))}}/s, on {{t.worker}}
%   elif t.state == 'failed':
{{fmt_time(t.finished)}} UTC: <span class="error">{{t.last_error}}</span>
%   else:
{{fmt_time(t.finished)}} UTC
%   end
</td>
<td>
%   if me.level == 'admin' and t.state in ('pending', 'failed'):
<form class="inline" method="post" action="/tasks/{{t.id}}/retry"><input type="hidden" name="csrf_token" value="{{csrf}}"><button>Retry now</button></form>
%   end
%   if me.level == 'admin' and t.state == 'pending':
<form class="inline" method="post" action="/tasks/{{t.id}}/cancel"><input type="hidden" name="csrf_token" value="{{csrf}}"><button>Cancel</button></form>
%   end
</td></tr>
% end
</table>
% end
% end
<h2>Running</h2>
% task_rows(running, 'Progress')
<h2>Pending</h2>
% task_rows(pending, 'Next attempt')
<h2>Failed recently</h2>
% task_rows(failed, 'Error')
<h2>Finished recently</h2>
% task_rows(done, 'Finished')
