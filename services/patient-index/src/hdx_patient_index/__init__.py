"""HDX patient index: links each source's (source, local patient id) to an enterprise person
and stamps that person's id on everything it forwards (hdx.validated → hdx.identified)."""
