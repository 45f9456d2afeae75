% if not observations:
<p class="note">No observations.</p>
% else:
<table>
<tr><th>Obsid</th><th>Start JD</th><th>Start (UTC)</th><th>Stop JD</th><th>Duration</th><th>Start LST</th><th>Files</th><th>Size</th><th>Session</th></tr>
% for o in observations:
<tr><td><a href="/observations/{{o.obsid}}">{{o.obsid}}</a></td><td class="mono">{{fmt_jd(o.start_time_jd)}}</td>
<td>{{jd_to_utc(o.start_time_jd)}}</td><td class="mono">{{fmt_jd(o.stop_time_jd)}}</td>
<td class="duration">{{'-' if o.stop_time_jd is None else '%.1f min' % ((o.stop_time_jd - o.start_time_jd) * 1440)}}</td>
<td>{{fmt_lst(o.start_lst_hr)}}</td><td class="n-files">{{o.n_files}}</td>
<td class="size" title="{{o.size}} bytes">{{human_size(o.size)}}</td>
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
