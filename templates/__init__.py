"""jinja2 templates of the generated modules (shipped inside the package as ``optgen.templates``)."""
