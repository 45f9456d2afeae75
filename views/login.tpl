% rebase('layout', title=title)
<h1>Log in</h1>
% if error:
<p class="error">{{error}}</p>
% end
<form method="post" action="/login">
  <input type="hidden" name="next" value="{{next}}">
  <input type="hidden" name="login_token" value="{{login_token}}">
  <label>Authenticator <input type="password" name="authenticator" size="40" autofocus></label>
  <button type="submit">Log in</button>
</form>
