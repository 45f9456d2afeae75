% rebase('layout', title=title)
<h1>{{site_name}}</h1>
<p>Librarian {{version}} · <span id="now-utc">{{now_utc}} UTC</span> ·
at the telescope {{now_site}} ({{zone}})</p>
<div class="quicklook"><img id="volume" src="/pictures/volume.png" width="720" height="300" alt="{{volume_alt}}"></div>
<h2>Recent sessions</h2>
% include('session_table', sessions=sessions, counts=False)
<p><a href="/sessions/recent">more sessions</a></p>
<h2>Recent files</h2>
% include('file_table', files=files)
<h2>Stores</h2>
% include('store_table', stores=stores)
