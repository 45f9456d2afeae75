% rebase('layout', title=title)
<h1>Observation {{obs.obsid}}</h1>
<table>
<tr><th>Start</th><td>JD {{fmt_jd(obs.start_time_jd)}} · {{jd_to_utc(obs.start_time_jd)}} UTC</td></tr>
<tr><th>Stop</th><td>JD {{fmt_jd(obs.stop_time_jd)}} · {{jd_to_utc(obs.stop_time_jd)}} UTC</td></tr>
<tr><th>Start LST</th><td>{{fmt_lst(obs.start_lst_hr)}}</td></tr>
<tr><th>Session</th><td>
% if obs.session_id is not None:
<a href="/sessions/{{obs.session_id}}">{{obs.session_id}}</a>
% else:
none yet
% end
</td></tr>
</table>
<h2>Files</h2>
% include('file_table', files=files)
