"""HTML for the web UI without a template engine: ``string.Template`` texts whose values are
escaped unless they are :class:`Markup` (HTML built here, already escaped).

    render(PAGE, title="Worklist", body=Markup(...))   # title escaped, body as it is

Pages keep their HTML in module constants and build repeated parts (rows, forms) with
:func:`render` too, so every value from the store or the request passes through
``html.escape`` once. The stylesheet is served from /ui/static/ (the Content-Security-Policy
allows no inline style or script).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from string import Template
from typing import Any


class Markup(str):
    """HTML that is already safe: inserted as it is."""


def escape(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def render(template: str | Template, **values: Any) -> Markup:
    """``template`` with each ``$name`` replaced by its value, escaped unless Markup."""
    tpl = template if isinstance(template, Template) else Template(template)
    return Markup(tpl.substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Markup]) -> Markup:
    return Markup("".join(parts))


def csrf_field(token: str) -> Markup:
    return render('<input type="hidden" name="csrf" value="$token">', token=token)


PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · pxsgate</title>
<link rel="stylesheet" href="/ui/static/pxsgate.css">
</head>
<body>
<header>
<span class="brand">pxsgate</span>
<nav>$nav</nav>
$account
</header>
<main>
<h1>$title</h1>
$message
$body
</main>
</body>
</html>
""")

ACCOUNT = Template("""<form class="account" method="post" action="/ui/logout">
<span class="user">$user ($role)</span>
$csrf
<button type="submit">Log out</button>
</form>""")

STYLE = """\
body { font-family: system-ui, sans-serif; margin: 0; color: #1b1f24; }
header { display: flex; gap: 1.5rem; align-items: center; padding: .5rem 1rem;
         background: #1b3a57; color: #fff; }
header a { color: #fff; }
header .brand { font-weight: bold; }
header nav { flex: 1; display: flex; gap: 1rem; }
header form.account { display: flex; gap: .5rem; align-items: center; }
main { padding: 1rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #d0d7de; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.message { padding: .5rem; background: #fff3cd; border: 1px solid #e0c36c; }
.error { padding: .5rem; background: #f8d7da; border: 1px solid #d9a0a6; }
form.login { display: grid; gap: .5rem; max-width: 20rem; }
form.review { display: flex; gap: .25rem; }
.flag { color: #9a3412; }
tr.flagged { background: #fff7ed; }
form.filters { display: flex; flex-wrap: wrap; gap: .75rem; align-items: end;
               margin-bottom: 1rem; }
form.filters input[type=number] { width: 6rem; }
form.inline { display: inline; }
.pager { display: flex; gap: 1rem; }
dl.study { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }
dl.study dt { font-weight: bold; }
ol.timeline { display: flex; gap: 1rem; list-style: none; padding: 0; flex-wrap: wrap; }
ol.timeline li { border: 1px solid #d0d7de; padding: .25rem .5rem; border-radius: 4px; }
ol.timeline li.missing { color: #8c959f; }
ol.timeline .stage { font-weight: bold; }
ol.timeline .took { color: #1b3a57; }
.instances, .inputs { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; max-width: 260px; }
figure.used { outline: 3px solid #1a7f37; }
figure.unused { outline: 3px solid #bf8700; opacity: .85; }
figcaption { font-size: .85rem; overflow-wrap: anywhere; }
img.thumb { max-width: 256px; max-height: 256px; display: block; background: #000; }
img.input { width: 320px; height: 320px; display: block; }
.nopic { display: block; padding: 2rem; background: #eee; }
.uid { color: #57606a; font-size: .75rem; }
pre.document { background: #f6f8fa; padding: .5rem; overflow: auto; max-height: 30rem; }
"""
