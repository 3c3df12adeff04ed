"""One rendering for every dashboard form: Django's form templates, overridden in
templates/forms/ and styled by static/aichor.css, so `{{ form }}` looks the same on every page."""

from django.forms.renderers import TemplatesSetting


class FormRenderer(TemplatesSetting):
    # TemplatesSetting reads the project's TEMPLATES (templates/forms/ is found there); the
    # widgets' own templates come from the django.forms app.
    form_template_name = "forms/form.html"
    field_template_name = "forms/field.html"
