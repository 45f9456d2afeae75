% rebase('layout', title=title)
<h1>Standing order {{order.name}}</h1>
<table>
<tr><th>Connection</th><td>{{order.conn_name}}</td></tr>
<tr><th>Search</th><td class="mono">{{order.search}}</td></tr>
<tr><th>Created</th><td>{{fmt_time(order.created)}} UTC</td></tr>
</table>
% if me.level == 'admin':
<h2>Edit</h2>
% if error:
<p class="error">{{error}}</p>
% end
<form method="post" action="/standing-orders/{{quote(order.name)}}">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <p><label>Connection <input name="conn_name" value="{{order.conn_name}}"></label></p>
  <p><textarea name="search" rows="4" cols="80">{{order.search}}</textarea></p>
  <p><button type="submit">Save</button></p>
</form>
<form method="post" action="/standing-orders/{{quote(order.name)}}/delete">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <button type="submit">Delete this standing order</button>
</form>
% end
