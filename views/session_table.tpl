% if not sessions:
<p class="note">No sessions.</p>
% else:
<table>
<tr><th>Session</th><th>Start JD</th><th>Start (UTC)</th><th>Stop JD</th><th class="num">Length</th>
% if counts:
<th class="num">Observations</th><th class="num">Files</th><th class="num">Size</th>
% end
</tr>
% for s in sessions:
<tr><td><a href="/sessions/{{s.id}}">{{s.id}}</a></td><td class="mono">{{fmt_jd(s.start_time_jd)}}</td>
<td>{{jd_to_utc(s.start_time_jd)}}</td><td class="mono">{{fmt_jd(s.stop_time_jd)}}</td>
<td class="num">{{fmt_days(s.stop_time_jd - s.start_time_jd)}}</td>
% if counts:
<td class="num">{{s.n_obs}}</td><td class="num">{{s.n_files}}</td>
<td class="num" title="{{s.size}} bytes">{{human_size(s.size)}}</td>
% end
</tr>
% end
</table>
% end
