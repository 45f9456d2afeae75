% rebase('layout', title=title)
<h1>Standing orders</h1>
<p class="note">Every file matching an order's search is copied to its connection, once.
Mode: <strong>{{mode}}</strong>.</p>
% if not orders:
<p class="note">No standing orders.</p>
% else:
<table>
<tr><th>Name</th><th>Connection</th><th>Search</th></tr>
% for o in orders:
<tr><td><a href="/standing-orders/{{quote(o.name)}}">{{o.name}}</a></td><td>{{o.conn_name}}</td><td class="mono">{{o.search}}</td></tr>
% end
</table>
% end
% if me.level == 'admin':
<h2>New standing order</h2>
% if error:
<p class="error">{{error}}</p>
% end
<form method="post" action="/standing-orders">
  <input type="hidden" name="csrf_token" value="{{csrf}}">
  <p><label>Name <input name="name" value="{{form['name']}}"></label>
  <label>Connection <input name="conn_name" value="{{form['conn_name']}}"></label></p>
  <p><textarea name="search" rows="4" cols="80">{{form['search']}}</textarea></p>
  <p><button type="submit">Create</button></p>
</form>
% end
