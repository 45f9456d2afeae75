% rebase('layout', title=title)
<h1>Store {{store.name}}</h1>
% total, used, free = usage
<table>
<tr><th>Host</th><td>{{store.ssh_host}}</td></tr>
<tr><th>Path</th><td class="mono">{{store.path_prefix}}</td></tr>
<tr><th>Reached</th><td id="access">{{access}}<span class="error">{{'' if problem is None else ' (now: ' + problem + ')'}}</span></td></tr>
<tr><th>Available for uploads</th><td id="available">{{'yes' if store.available else 'no'}}</td></tr>
<tr><th>Capacity</th><td title="{{total}} bytes">{{human_size(total)}}</td></tr>
<tr><th>Used / free</th><td><span title="{{used}} bytes">{{human_size(used)}}</span> /
<span title="{{free}} bytes">{{human_size(free)}}</span></td></tr>
<tr><th>Instances</th><td>{{n_instances}} ({{human_size(instance_bytes)}})</td></tr>
<tr><th>Reconciliation</th><td><a id="reconcile" href="/stores/{{quote(store.name)}}/reconcile">last report, or run one now</a></td></tr>
</table>
<div class="quicklook"><img id="space" src="/stores/{{quote(store.name)}}/space.png" width="720" height="300" alt="{{space_alt}}"></div>
% if me.level == 'admin':
<form method="post" action="/stores/{{quote(store.name)}}/{{'make-unavailable' if store.available else 'make-available'}}">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <button type="submit" id="toggle">{{'Make unavailable' if store.available else 'Make available'}}</button>
</form>
% end
