% if not observations:
<p class="note">No observations.</p>
% else:
<table>
<tr><th>Obsid</th><th>Start JD</th><th>Start (UTC)</th><th>Stop JD</th><th>Start LST</th><th>Session</th></tr>
% for o in observations:
<tr><td><a href="/observations/{{o.obsid}}">{{o.obsid}}</a></td><td class="mono">{{fmt_jd(o.start_time_jd)}}</td>
<td>{{jd_to_utc(o.start_time_jd)}}</td><td class="mono">{{fmt_jd(o.stop_time_jd)}}</td>
<td>{{fmt_lst(o.start_lst_hr)}}</td>
<td>
% if o.session_id is not None:
<a href="/sessions/{{o.session_id}}">{{o.session_id}}</a>
% else:
-
% end
</td></tr>
% end
</table>
% end
