<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title if title == get('site_name') else title + ' · ' + get('site_name', 'Librarian')}}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2329; background: #fafbfc; }
header { background: #1f3447; color: #fff; padding: .5em 1.2em; display: flex; gap: 1.2em;
         align-items: baseline; flex-wrap: wrap; }
header a { color: #dfe9f3; text-decoration: none; }
header a:hover { color: #fff; text-decoration: underline; }
header .site { font-weight: bold; color: #fff; margin-right: 1em; }
header .me { margin-left: auto; font-size: .9em; color: #b9c9d8; }
main { padding: 1em 1.2em; max-width: 80em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { text-align: left; padding: .25em .8em .25em 0; border-bottom: 1px solid #e3e7eb;
         vertical-align: top; }
th { font-weight: 600; color: #4a5561; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: .92em; }
h1.mono { font-size: 1.6em; word-break: break-all; }
.error { color: #a40000; background: #fff0f0; border: 1px solid #f2c5c5; padding: .4em .7em; }
.error:empty { display: none; }
td { overflow-wrap: anywhere; }
@media (max-width: 40em) { main { padding: .6em; } table { display: block; overflow-x: auto; } }
.note { color: #4a5561; }
.bar { display: inline-block; width: 12em; height: .8em; background: #e3e7eb;
       vertical-align: middle; }
.bar span { display: block; height: 100%; background: #3d7ab8; }
textarea { width: 100%; max-width: 60em; font-family: ui-monospace, monospace; }
form.inline { display: inline; }
.pager a { margin-right: 1em; }
.quicklook img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
</style>
</head>
<body>
<header>
  <a class="site" href="/">{{get('site_name', 'Librarian')}}</a>
% if get('me'):
%   for href, label, level in nav:
%     if me.allows(level):
  <a href="{{href}}">{{label}}</a>
%     end
%   end
  <span class="me">{{me.name}} ({{me.level}}) · <a href="/logout">log out</a></span>
% end
</header>
<main>
{{!base}}
</main>
</body>
</html>
