% rebase('layout', title=title)
<h1>{{title}}</h1>
<p><a href="/search-sessions">Search sessions</a>
% if all_link:
· <a href="/sessions/all">all sessions</a>
% end
</p>
<div class="quicklook"><img id="timeline" src="/pictures/sessions.png" width="720" height="300" alt="{{timeline_alt}}"></div>
% include('session_table', sessions=sessions, counts=True)
% if not all_link:
% include('pager')
% end
