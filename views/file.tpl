% rebase('layout', title=title)
<h1 class="mono">{{file.name}}</h1>
<table>
<tr><th>Type</th><td>{{file.type}}</td></tr>
<tr><th>Size</th><td title="{{file.size}} bytes">{{human_size(file.size)}} ({{file.size}} bytes)</td></tr>
<tr><th>MD5</th><td class="mono">{{file.md5}}</td></tr>
<tr><th>Registered</th><td>{{fmt_time(file.create_time)}} UTC by {{file.source}}</td></tr>
<tr><th>Observation</th><td>
% if file.obsid is not None:
<a href="/observations/{{file.obsid}}">{{file.obsid}}</a>: JD {{fmt_jd(file.observation.start_time_jd)}}
({{jd_to_utc(file.observation.start_time_jd)}} UTC), LST {{fmt_lst(file.observation.start_lst_hr)}}
% else:
none
% end
</td></tr>
</table>
% if any(i.verify_result in (None, 'ok') for i in instances):
<p><a id="download" href="/stream/{{quote(file.name)}}">Download</a></p>
% elif instances:
<p class="note" id="no-good-copy">No good copy to download here: every instance is corrupt or missing.</p>
% end
<h2>Quick look</h2>
% if look is None:
<p class="note" id="no-quick-look">{{no_look}}</p>
% else:
% s = look['summary']
% if no_look:
<p class="error" id="quick-look-choice-refused">{{no_look}}</p>
% end
<div class="quicklook">
<img id="waterfall" src="/files/{{quote(file.name)}}/waterfall.png{{'?' + look_query if look_query else ''}}"
 width="720" height="440"
 alt="Waterfall of baseline {{look['baseline'][0]}}-{{look['baseline'][1]}}, polarization {{look['pol']}}: visibility amplitude over {{s['n_times']}} integrations ({{'%.2f' % s['span_minutes']}} minutes from JD {{'%.5f' % s['start_jd']}}) and {{s['n_channels']}} channels from {{'%.3f' % s['freq_min_mhz']}} to {{'%.3f' % s['freq_max_mhz']}} MHz.">
<table id="header-summary">
<tr><th>Antennas</th><td>{{s['n_antennas']}}</td></tr>
<tr><th>Baselines</th><td>{{s['n_baselines']}}</td></tr>
<tr><th>Frequencies</th><td>{{'%.3f' % s['freq_min_mhz']}} to {{'%.3f' % s['freq_max_mhz']}} MHz, {{s['n_channels']}} channels{{(' of %.3f kHz' % s['channel_width_khz']) if s['channel_width_khz'] else ''}}</td></tr>
<tr><th>Integration</th><td>{{'%.3f' % s['integration_s']}} s</td></tr>
<tr><th>Polarizations</th><td>{{', '.join(s['polarizations'])}}</td></tr>
<tr><th>Time span</th><td>{{s['n_times']}} integrations, JD {{'%.5f' % s['start_jd']}} to {{'%.5f' % s['stop_jd']}} ({{'%.2f' % s['span_minutes']}} minutes from the first to the last)</td></tr>
</table>
</div>
<form method="get" action="/files/{{quote(file.name)}}" id="quicklook-choice">
<label>Baseline <select name="baseline">
% for a, b in look['baselines']:
<option value="{{a}}-{{b}}"{{' selected' if (a, b) == tuple(look['baseline']) else ''}}>{{a}}-{{b}}</option>
% end
</select></label>
<label>Polarization <select name="pol">
% for p in look['pols']:
<option{{' selected' if p == look['pol'] else ''}}>{{p}}</option>
% end
</select></label>
<button type="submit">Show</button>
</form>
% end
<h2>Instances</h2>
% if not instances:
<p class="note">No instance here: this Librarian knows the file only by its record.</p>
% else:
<table>
<tr><th>Store</th><th>Host</th><th>Path</th><th>Deletion policy</th><th>Last verified (UTC)</th></tr>
% for i in instances:
<tr><td><a href="/stores/{{quote(i.store.name)}}">{{i.store.name}}</a></td><td>{{i.store.ssh_host}}</td>
<td class="mono">{{i.full_path_on_store}}</td><td>{{'allowed' if i.deletion_policy else 'disallowed'}}</td>
<td class="verify-{{i.verify_result or 'never'}}">{{(i.verify_result or 'never') if not i.verified_at else '%s: %s' % (fmt_time(i.verified_at), i.verify_result)}}</td></tr>
% end
</table>
% end
<h2>Copies at other Librarians</h2>
% if not remote_instances:
<p class="note">No other Librarian is known to hold a copy.</p>
% else:
<table id="remote-instances">
<tr><th>Librarian</th><th>Store</th><th>Path</th><th>MD5 it computed</th><th>Verified (UTC)</th><th>Confirmed (UTC)</th></tr>
% for r in remote_instances:
<tr><td>{{r.librarian}}</td><td>{{r.store_name}}</td><td class="mono">{{r.store_path}}</td>
<td class="mono">{{r.md5}}{{'' if r.md5 == file.md5 else ' (differs from the record)'}}</td>
<td>{{fmt_time(r.verified_at)}}</td><td>{{fmt_time(r.confirmed_at)}}</td></tr>
% end
</table>
% end
<h2 id="events">Events</h2>
% if me.allows('read-append'):
<form method="post" action="/files/{{quote(file.name)}}/events" id="add-event">
<input type="hidden" name="csrf_token" value="{{csrf}}">
<label>Event type <input name="type" required maxlength="64" placeholder="qa_checked"></label>
<label>Payload (JSON object) <input name="payload" placeholder='{"score": 0.9}'></label>
<button type="submit">Add event</button>
</form>
% end
% if not events:
<p class="note">No events.</p>
% else:
<table>
<tr><th>Time (UTC)</th><th>Type</th><th>Payload</th></tr>
% for e in events:
<tr><td>{{fmt_time(e.time)}}</td><td>{{e.type}}</td><td class="mono">{{e.payload}}</td></tr>
% end
</table>
% end
