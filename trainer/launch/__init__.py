"""Starting peers: the local launcher and supervisor (``local``), the pre-loaded zygote that
forks peers (``zygote``), and the run summary rebuilt from the peers' event files
(``summary``)."""
