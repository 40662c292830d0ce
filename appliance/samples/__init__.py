"""Hard samples: frames the models were unsure about or got wrong, kept for retraining (docs/samples.md).

``policy`` decides which results become samples, ``spool`` keeps them within a quota, ``redact`` blurs what
must not leave the site, ``uploader`` sends them to the AppStore's inbox as the site's policy allows.
"""
