<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}} · Librarian</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { background: #203040; color: #fff; padding: .6em 1.2em; }
header a { color: #fff; text-decoration: none; margin-right: 1em; }
main { padding: 1em 1.2em; max-width: 70em; }
.error { color: #a00; }
</style>
</head>
<body>
<header><a href="/"><strong>Librarian</strong></a></header>
<main>
{{!base}}
</main>
</body>
</html>
