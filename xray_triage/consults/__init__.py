"""Consult and annotation rules: who may do what to a study, in core, without the web app.

``rules.py`` is the consult life cycle, ``annotations.py`` who may mark an image and
how marks are listed, ``geometry.py`` where a mark may be, ``visibility.py`` which
studies a user may see. They raise
``errors.RuleError`` subclasses with a stable ``code`` and parameters; a front end
(the web app, the CLI, an exporter) turns those into its own kind of message.
"""
