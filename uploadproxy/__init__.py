"""uploadproxy: the authenticated, streaming front door for uploads (reference §6.1, §6.5).

    app.py       make_app(settings, client): the aiohttp application (`cdi server` hosts it)
    main.py      `cdi-uploadproxy`: the same served alone over HTTPS
    settings.py  ProxySettings, ResolveMode
    auth.py      bearer token → the PVC it names (400/401)
    target.py    PVC readiness wait, content-type path, upload server address (503)
    upstream.py  mutual TLS to upload servers, streaming both ways (502)
    naming.py    CDI's upload pod/Service names (a copy of cdi.controller.naming's rule)
    errors.py    Rejection: status + text, translated to a response in app.py

Imports only cdi.api and cdi.kube of ours.
"""
