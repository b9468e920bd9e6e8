"""The web UI under /ui/ on the HTTP port (issue 22): pages for the people who read and run
pxsgate, with users and roles of their own and an audit trail.

- auth.py: logins, sessions, CSRF, single sign-on, the role guard (``require``) and
  ``current_user``; the security headers of every /ui/ response;
- audit.py: the audit trail (store rows and ``audit.*`` log events, PS3.15-shaped);
- passwords.py: the scrypt password hashes;
- html.py: escaping string templates, the layout and the stylesheet;
- login.py: the login form and logout;
- pages.py: the worklist and the review action; study.py: the study page, pictures by key;
  operations.py: queues, retry, force; services.py: what the pages get from the gateway;
- app.py: the routes, and the sub-application service/api.py mounts under /ui/.

Not behind the API's bearer token: /ui/ has its own login (service/api.py skips it).
"""
