% rebase('layout', title=title)
<h1>Staging</h1>
<p>Copying {{reply['n_instances']}} file(s), <span title="{{reply['n_bytes']}} bytes">{{human_size(reply['n_bytes'])}}</span>,
into <code>{{reply['destination']}}</code>. <code>STAGING-SUCCEEDED</code> or
<code>STAGING-ERRORS</code> appears there when it is done; see also the <a href="/tasks">tasks</a>.</p>
