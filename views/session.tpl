% rebase('layout', title=title)
<h1>Session {{session.id}}</h1>
<table>
<tr><th>Start</th><td>JD {{fmt_jd(session.start_time_jd)}} · {{jd_to_utc(session.start_time_jd)}} UTC</td></tr>
<tr><th>Stop</th><td>JD {{fmt_jd(session.stop_time_jd)}} · {{jd_to_utc(session.stop_time_jd)}} UTC</td></tr>
<tr><th>Observations</th><td>{{session.n_obs}}</td></tr>
<tr><th>Files</th><td>{{session.n_files}}, of which {{n_local}} with a copy on this Librarian's stores</td></tr>
<tr><th>Total size</th><td title="{{session.size}} bytes">{{human_size(session.size)}}</td></tr>
</table>
<h2>Observations</h2>
% include('obs_table', observations=observations)
<h2>Files</h2>
% include('file_table', files=files)
